//! What a user sees at the command line: `runnel check`, `runnel replay`
//! and `runnel run`, run as real processes on real files in a temp dir.
//!
//! Each test reads as one rule of the command line's behaviour: exit code,
//! what reaches stdout, and what stderr says (file:line of the problem,
//! counters in the summary line). Log lines are compared with terminal
//! colour codes stripped, so only the colour test depends on them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use runnel_tests::{
    items_of, jsonl_items, replay_records, run_with_timeout, runnel_command, show, sorted, strip_ansi,
    write_agent_config, write_file, Agent, Finished,
};
use serde_json::{json, Value};
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `runnel` started in `dir`, with no log settings inherited from the caller.
fn runnel(dir: &Path) -> Command {
    runnel_command(dir)
}

fn run(dir: &Path, args: &[&str]) -> Finished {
    run_with_timeout(runnel(dir).args(args), TIMEOUT)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    write_file(dir, name, text)
}

/// `text` without ANSI escape sequences.
fn plain(text: &str) -> String {
    strip_ansi(text)
}

fn stderr_of(done: &Finished) -> String {
    plain(&done.stderr_text())
}

fn assert_exit_ok(done: &Finished) {
    assert_eq!(done.status.code(), Some(0), "expected exit 0:\n{}", show(done));
}

fn assert_exit_failed(done: &Finished) {
    assert!(
        matches!(done.status.code(), Some(c) if c != 0),
        "expected a non-zero exit code:\n{}",
        show(done)
    );
}

fn assert_stderr_has(done: &Finished, needle: &str) {
    assert!(
        stderr_of(done).contains(needle),
        "stderr should contain {needle:?}:\n{}",
        show(done)
    );
}

/// The counters of the summary line `flow FLOW finished: a=1 b=2` (or
/// `stopped:`), as a map.
fn summary_counters(stderr: &str, flow_id: &str) -> BTreeMap<String, u64> {
    let finished = format!("flow {flow_id} finished:");
    let stopped = format!("flow {flow_id} stopped:");
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains(&finished) || l.contains(&stopped))
        .unwrap_or_else(|| panic!("no summary line for flow {flow_id} in stderr:\n{stderr}"));
    let at = line.find(&finished).or_else(|| line.find(&stopped)).unwrap();
    let rest = line[at..].split_once(':').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .filter_map(|tok| tok.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Sum of the counters whose name starts with `prefix`.
fn counted(counters: &BTreeMap<String, u64>, prefix: &str) -> u64 {
    counters
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| *v)
        .sum()
}

// ---------------------------------------------------------------------------
// Test data: two sensors, a few readings, 10 s tumbling windows
// ---------------------------------------------------------------------------

/// 2024-01-01T00:00:00Z as Unix seconds: window 0 starts here.
const T0: i64 = 1_704_067_200;

/// (sensor, seconds after T0, temperature). Times rise per sensor and no
/// reading is late (the flow waits 5 s).
const READINGS: [(&str, i64, f64); 7] = [
    ("a", 1, 20.0),
    ("b", 2, 10.0),
    ("a", 5, 22.0),
    ("b", 7, 14.0),
    ("a", 13, 30.0),
    ("b", 15, 11.0),
    ("b", 16, 14.0),
];

/// Per sensor and 10 s window: `[sensor, [window_id, {"temp": {"mean", "count"}}]]`,
/// worked out from READINGS.
fn expected_window_stats() -> Vec<Value> {
    let mut windows: BTreeMap<(&str, i64), Vec<f64>> = BTreeMap::new();
    for (sensor, dt, temp) in READINGS {
        windows.entry((sensor, dt / 10)).or_default().push(temp);
    }
    // Spelled out, so a reader can check the arithmetic:
    // a/0: 20, 22 -> mean 21, count 2     a/1: 30 -> mean 30, count 1
    // b/0: 10, 14 -> mean 12, count 2     b/1: 11, 14 -> mean 12.5, count 2
    let by_hand = [
        ("a", 0, 21.0, 2),
        ("a", 1, 30.0, 1),
        ("b", 0, 12.0, 2),
        ("b", 1, 12.5, 2),
    ];
    assert_eq!(windows.len(), by_hand.len());
    for (sensor, w, mean, count) in by_hand {
        let temps = &windows[&(sensor, w)];
        assert_eq!(temps.len(), count);
        assert_eq!(temps.iter().sum::<f64>() / temps.len() as f64, mean);
    }
    sorted(
        by_hand
            .iter()
            .map(|(sensor, w, mean, count)| json!([sensor, [w, {"temp": {"mean": mean, "count": count}}]]))
            .collect(),
    )
}

fn reading_json(sensor: &str, dt: i64, temp: f64) -> String {
    format!(
        "{{\"sensor\": \"{sensor}\", \"ts\": {}, \"temp\": {temp:?}}}\n",
        T0 + dt
    )
}

/// A flow: readings from `source_path` keyed by sensor, 10 s tumbling
/// windows on the "ts" field (Unix seconds, wait 5 s), mean and count of
/// "temp", written to `sink`.
fn window_flow(flow_id: &str, source_path: &str, sink: &str) -> String {
    format!(
        r#"from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("{flow_id}")
readings = op.input("in", flow, sources.file("{source_path}"))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=5), unit="s")
windower = win.TumblingWindower(timedelta(seconds=10), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("stats", keyed, clock, windower, {{"temp": ["mean", "count"]}})
op.output("out", stats.down, {sink})
op.output("meta", stats.meta, sinks.stdout())
"#
    )
}

// ---------------------------------------------------------------------------
// --version, --help, check on a valid flow
// ---------------------------------------------------------------------------

#[test]
fn version_flag_prints_the_package_version() {
    let dir = TempDir::new().unwrap();
    let done = run(dir.path(), &["--version"]);
    assert_exit_ok(&done);
    assert_eq!(
        done.stdout_text().trim(),
        format!("runnel {}", env!("CARGO_PKG_VERSION")),
        "{}",
        show(&done)
    );
}

#[test]
fn every_subcommand_has_help() {
    let dir = TempDir::new().unwrap();
    for sub in ["check", "replay", "run", "demo"] {
        let done = run(dir.path(), &[sub, "--help"]);
        assert_exit_ok(&done);
        let out = done.stdout_text();
        assert!(
            out.contains(&format!("Usage: runnel {sub}")),
            "{sub} --help:\n{}",
            show(&done)
        );
    }
    let done = run(dir.path(), &["--help"]);
    assert_exit_ok(&done);
    for sub in ["check", "replay", "run"] {
        assert!(
            done.stdout_text().contains(sub),
            "runnel --help should list {sub}:\n{}",
            show(&done)
        );
    }
}

#[test]
fn check_on_a_valid_flow_prints_every_step_and_exits_0() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "temps.py",
        &window_flow("temps", "readings.jsonl", "sinks.stdout()"),
    );
    let done = run(dir.path(), &["check", "temps.py"]);
    assert_exit_ok(&done);
    let out = done.stdout_text();
    for id in ["temps", "in", "by_sensor", "stats", "out", "meta"] {
        assert!(out.contains(id), "the step graph should name {id:?}:\n{}", show(&done));
    }
    // The graph shows where windows feed the outputs.
    assert!(
        out.contains("stats.down") && out.contains("stats.meta"),
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// check on broken flow files: the error names file:line
// ---------------------------------------------------------------------------

#[test]
fn check_reports_a_syntax_error_with_file_and_line() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "syntax.py",
        "from runnel import Dataflow\n\nflow = Dataflow(\"x\")\ntotal = = 1\nprint('never')\n",
    );
    let done = run(dir.path(), &["check", "syntax.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "syntax.py:4");
    assert_stderr_has(&done, "SyntaxError");
}

#[test]
fn check_reports_a_failed_import_with_file_and_line() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "imports.py",
        "from runnel import Dataflow\n\nimport no_such_module\n\nflow = Dataflow(\"x\")\n",
    );
    let done = run(dir.path(), &["check", "imports.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "imports.py:3");
    assert_stderr_has(&done, "ModuleNotFoundError");
    assert_stderr_has(&done, "no_such_module");
}

#[test]
fn check_reports_a_non_callable_mapper_with_file_and_line() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "api.py",
        "from runnel import Dataflow, op, sources\n\
         flow = Dataflow(\"x\")\n\
         nums = op.input(\"in\", flow, sources.file(\"nums.jsonl\"))\n\
         \n\
         doubled = op.map(\"double\", nums, 42)\n",
    );
    let done = run(dir.path(), &["check", "api.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "api.py:5");
    assert_stderr_has(&done, "TypeError");
    assert_stderr_has(&done, "callable");
}

#[test]
fn check_reports_a_sliding_window_offset_longer_than_its_length_with_file_and_line() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "sliding.py",
        "from datetime import datetime, timedelta, timezone\n\
         from runnel import Dataflow, win\n\
         flow = Dataflow(\"x\")\n\
         align = datetime(2024, 1, 1, tzinfo=timezone.utc)\n\
         windower = win.SlidingWindower(timedelta(seconds=5), timedelta(seconds=10), align)\n",
    );
    let done = run(dir.path(), &["check", "sliding.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "sliding.py:5");
    assert_stderr_has(&done, "offset");
}

#[test]
fn check_reports_a_duplicate_step_id_naming_both_lines() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "dup.py",
        "from runnel import Dataflow, op, sources\n\
         flow = Dataflow(\"x\")\n\
         nums = op.input(\"in\", flow, sources.file(\"nums.jsonl\"))\n\
         once = op.map(\"twice\", nums, str)\n\
         \n\
         again = op.map(\"twice\", once, str)\n",
    );
    let done = run(dir.path(), &["check", "dup.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "twice");
    assert_stderr_has(&done, "dup.py:4");
    assert_stderr_has(&done, "dup.py:6");
}

#[test]
fn check_on_a_file_without_a_dataflow_says_it_defines_no_flow() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "empty.py", "from runnel import op\n\nx = 1\n");
    let done = run(dir.path(), &["check", "empty.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "empty.py");
    assert!(stderr_of(&done).to_lowercase().contains("no flow"), "{}", show(&done));
}

#[test]
fn check_reports_two_dataflows_with_the_same_id_naming_both() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "two.py",
        "from runnel import Dataflow, op, sources, sinks\n\
         first = Dataflow(\"same\")\n\
         op.output(\"out\", op.input(\"in\", first, sources.file(\"a.jsonl\")), sinks.stdout())\n\
         second = Dataflow(\"same\")\n\
         op.output(\"out\", op.input(\"in\", second, sources.file(\"b.jsonl\")), sinks.stdout())\n",
    );
    let done = run(dir.path(), &["check", "two.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "same");
    assert_stderr_has(&done, "two.py:2");
    assert_stderr_has(&done, "two.py:4");
}

#[test]
fn check_on_a_missing_file_says_it_cannot_be_read() {
    let dir = TempDir::new().unwrap();
    let done = run(dir.path(), &["check", "nowhere.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "nowhere.py");
    let err = stderr_of(&done).to_lowercase();
    assert!(
        err.contains("no such file") || err.contains("not found"),
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// replay: bad records are skipped, counted and located; good ones come out
// ---------------------------------------------------------------------------

#[test]
fn replay_skips_bad_json_lines_names_file_and_line_and_counts_them() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "temps.py",
        &window_flow("temps", "unused.jsonl", "sinks.stdout()"),
    );

    // Good readings with bad lines in between.
    let good: Vec<Vec<u8>> = READINGS
        .iter()
        .map(|(s, dt, t)| reading_json(s, *dt, *t).into_bytes())
        .collect();
    let lines: Vec<Vec<u8>> = vec![
        good[0].clone(),                                                  // 1
        good[1].clone(),                                                  // 2
        b"this is not json\n".to_vec(),                                   // 3: malformed
        good[2].clone(),                                                  // 4
        b"   \n".to_vec(),                                                // 5: blank, skipped silently
        b"{\"sensor\": \"a\", \"note\": \"\xff\xfe\"}\n".to_vec(),        // 6: not UTF-8
        good[3].clone(),                                                  // 7
        b"{\"sensor\": \"a\", \"temp\": 99.0}\n".to_vec(),                // 8: no timestamp
        format!("{{\"ts\": {}, \"temp\": 99.0}}\n", T0 + 3).into_bytes(), // 9: no key
        good[4].clone(),                                                  // 10
        good[5].clone(),                                                  // 11
        good[6].clone(),                                                  // 12
    ];
    let (not_json, blank, not_utf8, no_ts, no_key) = (3, 5, 6, 8, 9);
    let data: Vec<u8> = lines.concat();
    fs::write(dir.path().join("readings.jsonl"), &data).unwrap();

    let done = run(dir.path(), &["replay", "temps.py", "--input", "in=readings.jsonl"]);
    assert_exit_ok(&done);
    assert_eq!(
        sorted(items_of(&done, "out")),
        expected_window_stats(),
        "{}",
        show(&done)
    );

    let err = stderr_of(&done);
    for bad in [not_json, not_utf8, no_ts, no_key] {
        assert_stderr_has(&done, &format!("readings.jsonl line {bad}"));
    }
    assert!(
        !err.contains(&format!("readings.jsonl line {blank}")),
        "a blank line is not an error:\n{}",
        show(&done)
    );
    let counters = summary_counters(&err, "temps");
    assert_eq!(
        counters.get("in.malformed"),
        Some(&2),
        "summary: {counters:?}\n{}",
        show(&done)
    );
    assert_eq!(
        counted(&counters, "by_sensor.skipped"),
        1,
        "item without a key: {counters:?}"
    );
    assert_eq!(
        counted(&counters, "stats.skipped"),
        1,
        "item without a timestamp: {counters:?}"
    );
}

#[test]
fn replay_skips_csv_rows_with_the_wrong_number_of_cells_names_file_and_line_and_counts_them() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "temps.py",
        &window_flow("temps", "unused.csv", "sinks.stdout()"),
    );

    // Line 1 is the header.
    let mut csv = String::from("sensor,ts,temp\n");
    let mut rows: Vec<String> = READINGS
        .iter()
        .map(|(s, dt, t)| format!("{s},{},{t:?}\n", T0 + dt))
        .collect();
    rows.insert(2, format!("a,{},21.0,extra\n", T0 + 4)); // line 4: four cells
    rows.insert(5, format!("b,{}\n", T0 + 6)); // line 7: two cells
    for r in &rows {
        csv.push_str(r);
    }
    write(dir.path(), "readings.csv", &csv);

    let done = run(dir.path(), &["replay", "temps.py", "--input", "in=readings.csv"]);
    assert_exit_ok(&done);
    assert_eq!(
        sorted(items_of(&done, "out")),
        expected_window_stats(),
        "{}",
        show(&done)
    );
    assert_stderr_has(&done, "readings.csv line 4");
    assert_stderr_has(&done, "readings.csv line 7");
    let counters = summary_counters(&stderr_of(&done), "temps");
    assert_eq!(
        counters.get("in.malformed"),
        Some(&2),
        "summary: {counters:?}\n{}",
        show(&done)
    );
    assert_eq!(
        counters.get("in.items"),
        Some(&(READINGS.len() as u64)),
        "summary: {counters:?}"
    );
}

// ---------------------------------------------------------------------------
// replay: Python exceptions in user functions
// ---------------------------------------------------------------------------

const INVERT_FLOW: &str = r#"from runnel import Dataflow, op, sources, sinks


def invert(x):
    return 10 // x


flow = Dataflow("inv")
nums = op.input("in", flow, sources.file("nums.jsonl"))
op.output("out", op.map("invert", nums, invert), sinks.stdout())
"#;

#[test]
fn an_exception_in_a_user_function_skips_that_item_and_logs_type_file_line_and_traceback() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "inv.py", INVERT_FLOW);
    write(dir.path(), "nums.jsonl", "1\n2\n0\n5\n");
    let done = run(dir.path(), &["replay", "inv.py"]);
    assert_exit_ok(&done);
    assert_eq!(
        items_of(&done, "out"),
        vec![json!(10), json!(5), json!(2)],
        "{}",
        show(&done)
    );
    assert_stderr_has(&done, "ZeroDivisionError");
    assert_stderr_has(&done, "inv.py:5");
    // Which record it was.
    assert_stderr_has(&done, "nums.jsonl line 3");
    // The traceback, down to the user's raising line.
    assert_stderr_has(&done, "Traceback (most recent call last)");
    assert_stderr_has(&done, "line 5, in invert");
    let counters = summary_counters(&stderr_of(&done), "inv");
    assert_eq!(
        counted(&counters, "invert."),
        1,
        "the failed item is counted: {counters:?}"
    );
}

#[test]
fn a_hundred_failing_items_log_at_most_five_warnings_and_a_suppressed_count() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "inv.py", INVERT_FLOW);
    let mut nums = "0\n".repeat(100);
    nums.push_str("1\n");
    write(dir.path(), "nums.jsonl", &nums);
    let done = run(dir.path(), &["replay", "inv.py"]);
    assert_exit_ok(&done);
    assert_eq!(items_of(&done, "out"), vec![json!(10)], "{}", show(&done));
    let err = stderr_of(&done);
    let full = err
        .lines()
        .filter(|l| l.contains("ZeroDivisionError") && l.contains("\"invert\""))
        .count();
    assert!(
        (1..=5).contains(&full),
        "expected 1..=5 warning lines for step invert, found {full}:\n{err}"
    );
    assert!(
        err.lines().any(|l| l.contains("95") && l.contains("not logged")),
        "a line should say the other 95 were not logged:\n{err}"
    );
    assert!(err.lines().count() < 60, "stderr should stay short:\n{err}");
    let counters = summary_counters(&err, "inv");
    assert_eq!(counted(&counters, "invert."), 100, "{counters:?}");
}

// ---------------------------------------------------------------------------
// replay --input
// ---------------------------------------------------------------------------

const TWO_INPUTS_FLOW: &str = r#"from runnel import Dataflow, op, sources, sinks

flow = Dataflow("two")
kitchen = op.input("kitchen", flow, sources.file("kitchen.jsonl"))
garage = op.input("garage", flow, sources.file("garage.jsonl"))
op.output("out", op.merge("both", kitchen, garage), sinks.stdout())
"#;

#[test]
fn input_for_an_unknown_step_is_an_error_listing_the_input_steps() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "two.py", TWO_INPUTS_FLOW);
    write(dir.path(), "data.jsonl", "1\n");
    let done = run(dir.path(), &["replay", "two.py", "--input", "attic=data.jsonl"]);
    assert_exit_failed(&done);
    assert!(done.stdout.is_empty(), "{}", show(&done));
    assert_stderr_has(&done, "attic");
    assert_stderr_has(&done, "kitchen");
    assert_stderr_has(&done, "garage");
}

#[test]
fn input_from_a_missing_file_is_an_error_naming_the_file() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "two.py", TWO_INPUTS_FLOW);
    let done = run(dir.path(), &["replay", "two.py", "--input", "kitchen=gone.jsonl"]);
    assert_exit_failed(&done);
    assert!(done.stdout.is_empty(), "{}", show(&done));
    assert_stderr_has(&done, "gone.jsonl");
    assert!(
        stderr_of(&done).to_lowercase().contains("no such file"),
        "{}",
        show(&done)
    );
}

#[test]
fn input_without_a_step_name_is_an_error_when_the_flow_has_two_inputs() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "two.py", TWO_INPUTS_FLOW);
    write(dir.path(), "data.jsonl", "1\n");
    let done = run(dir.path(), &["replay", "two.py", "--input", "data.jsonl"]);
    assert_exit_failed(&done);
    assert!(done.stdout.is_empty(), "{}", show(&done));
    assert_stderr_has(&done, "STEP=");
    assert_stderr_has(&done, "kitchen");
    assert_stderr_has(&done, "garage");
}

#[test]
fn input_with_step_names_feeds_each_input_from_its_file() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "two.py", TWO_INPUTS_FLOW);
    write(dir.path(), "k.jsonl", "1\n2\n");
    write(dir.path(), "g.jsonl", "30\n");
    let done = run(
        dir.path(),
        &[
            "replay",
            "two.py",
            "--input",
            "kitchen=k.jsonl",
            "--input",
            "garage=g.jsonl",
        ],
    );
    assert_exit_ok(&done);
    assert_eq!(
        sorted(items_of(&done, "out")),
        sorted(vec![json!(1), json!(2), json!(30)]),
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// replay: output shape
// ---------------------------------------------------------------------------

#[test]
fn replay_prints_tuples_as_arrays_and_datetimes_as_rfc3339_utc() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "shape.py",
        r#"from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, sources, sinks


def shape(x):
    return (
        x,
        ("nested", None),
        datetime(2024, 1, 1, 0, 0, 10, tzinfo=timezone.utc),
        datetime(2024, 1, 1, 2, 0, 10, 250000, tzinfo=timezone(timedelta(hours=2))),
        {"set": {3, 1, 2}, "seconds": timedelta(seconds=90, milliseconds=500), "nan": float("nan"), 7: "seven"},
    )


flow = Dataflow("shape")
nums = op.input("in", flow, sources.file("one.jsonl"))
op.output("out", op.map("shape", nums, shape), sinks.stdout())
"#,
    );
    write(dir.path(), "one.jsonl", "1\n");
    let done = run(dir.path(), &["replay", "shape.py"]);
    assert_exit_ok(&done);
    assert_eq!(
        items_of(&done, "out"),
        vec![json!([
            1,
            ["nested", null],
            "2024-01-01T00:00:10+00:00",
            "2024-01-01T00:00:10.250000+00:00",
            {"set": [1, 2, 3], "seconds": 90.5, "nan": null, "7": "seven"}
        ])],
        "{}",
        show(&done)
    );
}

#[test]
fn replay_prints_window_metadata_as_open_close_and_merged_ids() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "temps.py",
        &window_flow("temps", "unused.jsonl", "sinks.stdout()"),
    );
    let data: String = READINGS.iter().map(|(s, dt, t)| reading_json(s, *dt, *t)).collect();
    write(dir.path(), "readings.jsonl", &data);
    let done = run(dir.path(), &["replay", "temps.py", "--input", "readings.jsonl"]);
    assert_exit_ok(&done);
    let meta = |sensor: &str, w: i64| {
        let open = format!("2024-01-01T00:00:{:02}+00:00", w * 10);
        let close = format!("2024-01-01T00:00:{:02}+00:00", w * 10 + 10);
        json!([sensor, [w, {"open_time": open, "close_time": close, "merged_ids": []}]])
    };
    assert_eq!(
        sorted(items_of(&done, "meta")),
        sorted(vec![meta("a", 0), meta("a", 1), meta("b", 0), meta("b", 1)]),
        "{}",
        show(&done)
    );
    assert_eq!(
        sorted(items_of(&done, "out")),
        expected_window_stats(),
        "{}",
        show(&done)
    );
}

/// NOTE: needs replay to send Python's `sys.stdout` to stderr (being
/// implemented); until then `print` lands among the JSON lines.
#[test]
fn print_and_inspect_in_a_flow_do_not_corrupt_replay_stdout() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "noisy.py",
        r#"from runnel import Dataflow, op, sources, sinks

print("building the noisy flow")
flow = Dataflow("noisy")
nums = op.input("in", flow, sources.file("nums.jsonl"))
nums = op.inspect("peek", nums)


def shout(x):
    print("shouting", x)
    return x


op.output("out", op.map("shout", nums, shout), sinks.stdout())
"#,
    );
    write(dir.path(), "nums.jsonl", "1\n2\n3\n");
    let done = run(dir.path(), &["replay", "noisy.py"]);
    assert_exit_ok(&done);
    // replay_records panics on any stdout line that is not {"step", "item"}.
    let records = replay_records(&done);
    assert_eq!(
        records,
        vec![
            ("out".to_string(), json!(1)),
            ("out".to_string(), json!(2)),
            ("out".to_string(), json!(3))
        ],
        "{}",
        show(&done)
    );
    // What the flow printed is not lost: it goes to stderr.
    assert_stderr_has(&done, "building the noisy flow");
    assert_stderr_has(&done, "shouting 2");
    assert_stderr_has(&done, "peek: 3");
}

#[test]
fn keep_sinks_writes_bare_items_to_the_sink_file_next_to_the_flow_and_nothing_to_stdout() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let flow = write(
        &flows,
        "pairs.py",
        r#"from runnel import Dataflow, op, sources, sinks

flow = Dataflow("pairs")
nums = op.input("in", flow, sources.file("nums.jsonl"))
op.output("out", op.map("pair", nums, lambda x: (x, str(x))), sinks.file("out.jsonl"))
"#,
    );
    write(&flows, "nums.jsonl", "1\n2\n");
    let done = run_with_timeout(runnel(&elsewhere).arg("replay").arg(&flow).arg("--keep-sinks"), TIMEOUT);
    assert_exit_ok(&done);
    assert!(
        done.stdout.is_empty(),
        "nothing on stdout with --keep-sinks:\n{}",
        show(&done)
    );
    assert!(
        !elsewhere.join("out.jsonl").exists(),
        "the sink path is relative to the flow file, not the cwd"
    );
    let written =
        fs::read_to_string(flows.join("out.jsonl")).unwrap_or_else(|e| panic!("flows/out.jsonl: {e}\n{}", show(&done)));
    let items: Vec<Value> = written.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(items, vec![json!([1, "1"]), json!([2, "2"])], "out.jsonl:\n{written}");
}

#[test]
fn logs_written_to_a_pipe_carry_no_terminal_colour_codes() {
    // stderr here is a pipe, as under systemd or with `2>log.txt`.
    let dir = TempDir::new().unwrap();
    write(dir.path(), "inv.py", INVERT_FLOW);
    write(dir.path(), "nums.jsonl", "0\n1\n");
    let done = run_with_timeout(
        runnel(dir.path()).env_remove("NO_COLOR").args(["replay", "inv.py"]),
        TIMEOUT,
    );
    assert_exit_ok(&done);
    let raw = done.stderr_text();
    assert!(
        !raw.contains('\u{1b}'),
        "stderr is not a terminal, yet has escape codes:\n{}",
        raw.escape_debug()
    );
}

// ---------------------------------------------------------------------------
// run: the agent
// ---------------------------------------------------------------------------

#[test]
fn run_starts_the_good_flows_logs_the_broken_ones_and_stops_cleanly_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    write(
        &flows,
        "good.py",
        &window_flow("good", "readings.jsonl", "sinks.file(\"out.jsonl\")"),
    );
    write(
        &flows,
        "broken.py",
        "from runnel import Dataflow\nflow = Dataflow(\"broken\")\nx = (1,\n",
    );
    let data: String = READINGS.iter().map(|(s, dt, t)| reading_json(s, *dt, *t)).collect();
    write(&flows, "readings.jsonl", &data);
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);

    // The good flow's windows reach its sink file.
    let out_path = flows.join("out.jsonl");
    let expected = expected_window_stats();
    let items = agent.wait_for(Duration::from_secs(10), "the good flow's windows", || {
        let items = jsonl_items(&out_path);
        if items.len() >= expected.len() {
            Ok(items)
        } else {
            Err(format!("{} has {items:?}", out_path.display()))
        }
    });
    assert_eq!(sorted(items), expected);

    let log = agent.stderr();
    assert!(
        log.contains("broken.py:3") && log.contains("SyntaxError"),
        "the broken flow is logged:\n{log}"
    );

    // Stop it the way systemd does.
    thread::sleep(Duration::from_millis(300));
    let status = agent.terminate(Duration::from_secs(5));
    let log = agent.stderr();
    assert_eq!(status.code(), Some(0), "exit after SIGTERM ({status}):\n{log}");
    assert!(log.contains("stopped"), "a line should say the agent stopped:\n{log}");
}

#[test]
fn run_with_an_unknown_config_key_fails_naming_the_key_and_the_file() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent.toml", "flows_dri = \"flows\"\n");
    let done = run(dir.path(), &["run", "--config", "agent.toml"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "flows_dri");
    assert_stderr_has(&done, "agent.toml");
}

#[test]
fn run_with_a_missing_config_file_fails_naming_the_file() {
    let dir = TempDir::new().unwrap();
    let done = run(dir.path(), &["run", "--config", "absent.toml"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "absent.toml");
}

#[test]
fn replay_of_a_flow_whose_own_input_file_is_missing_fails_naming_the_file() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "lost.py",
        "from runnel import Dataflow, op, sources, sinks\n\
         flow = Dataflow(\"lost\")\n\
         op.output(\"out\", op.input(\"in\", flow, sources.file(\"nowhere.jsonl\")), sinks.stdout())\n",
    );
    let done = run(dir.path(), &["replay", "lost.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "nowhere.jsonl");
    assert_stderr_has(&done, "could not be read");
}

#[test]
fn run_skips_a_second_flow_file_whose_flow_id_is_taken_naming_both_files() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    for name in ["a.py", "b.py"] {
        write(
            &flows,
            name,
            "from runnel import Dataflow, op, sources, sinks\n\
             flow = Dataflow(\"same\")\n\
             op.output(\"out\", op.input(\"in\", flow, sources.file(\"d.jsonl\")), sinks.file(\"out.jsonl\"))\n",
        );
    }
    write(&flows, "d.jsonl", "{\"x\": 1}\n");
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log(Duration::from_secs(10), "already runs a flow with that id");
    let log = plain(&agent.stderr());
    assert!(
        log.contains("b.py") && log.contains("a.py"),
        "both files are named:\n{log}"
    );
    // The first flow runs: its one item reaches the sink, once.
    let out = flows.join("out.jsonl");
    let items = agent.wait_for(Duration::from_secs(10), "the first flow's item", || {
        let items = jsonl_items(&out);
        if items.is_empty() {
            Err("no output yet".to_string())
        } else {
            Ok(items)
        }
    });
    assert_eq!(items, vec![json!({"x": 1})]);
    assert_eq!(agent.terminate(Duration::from_secs(5)).code(), Some(0));
}

/// 5,000 readings of 5 sensors, one per second each.
fn many_readings() -> String {
    (0..5000)
        .map(|i| reading_json(&format!("s{}", i % 5), i / 5, 20.0 + (i % 7) as f64))
        .collect()
}

#[test]
fn a_flow_of_field_keys_a_field_clock_and_aggregate_never_calls_python() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "readings.jsonl", &many_readings());
    write(
        dir.path(),
        "native.py",
        &window_flow("native", "readings.jsonl", "sinks.stdout()"),
    );
    let done = run(dir.path(), &["replay", "native.py"]);
    assert_exit_ok(&done);
    let counters = summary_counters(&stderr_of(&done), "native");
    assert_eq!(counters.get("in.items"), Some(&5000), "{}", show(&done));
    assert_eq!(
        counters.get("python.jobs"),
        None,
        "the native path ran Python jobs:\n{}",
        show(&done)
    );
}

#[test]
fn python_steps_get_items_in_batches_not_one_call_per_item() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "readings.jsonl", &many_readings());
    write(
        dir.path(),
        "py.py",
        "from runnel import Dataflow, op, sources, sinks\n\
         flow = Dataflow(\"py\")\n\
         temps = op.map(\"temp\", op.input(\"in\", flow, sources.file(\"readings.jsonl\")), lambda r: r[\"temp\"])\n\
         op.output(\"out\", op.filter(\"warm\", temps, lambda t: t > 21), sinks.stdout())\n",
    );
    let done = run(dir.path(), &["replay", "py.py"]);
    assert_exit_ok(&done);
    let counters = summary_counters(&stderr_of(&done), "py");
    assert_eq!(counters.get("in.items"), Some(&5000), "{}", show(&done));
    let jobs = counters.get("python.jobs").copied().unwrap_or(0);
    // Two Python steps over 5,000 items: a handful of batches each, not 10,000 calls.
    assert!((2..=40).contains(&jobs), "python.jobs={jobs}:\n{}", show(&done));
    let warm = (0..5000).filter(|i| 20 + i % 7 > 21).count();
    assert_eq!(items_of(&done, "out").len(), warm, "{}", show(&done));
}

#[test]
fn an_unknown_log_level_is_an_error_not_silence() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "readings.jsonl", &many_readings());
    write(
        dir.path(),
        "f.py",
        &window_flow("f", "readings.jsonl", "sinks.stdout()"),
    );
    let done = run(dir.path(), &["--log-level", "warning", "replay", "f.py"]);
    assert_eq!(done.status.code(), Some(2), "{}", show(&done));
    assert_stderr_has(&done, "unknown log level \"warning\"");
}

#[test]
fn a_flow_file_defines_exactly_one_flow() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "two.py",
        "from runnel import Dataflow, op, sources, sinks\n\
         a = Dataflow(\"a\")\n\
         op.output(\"out\", op.input(\"in\", a, sources.file(\"a.jsonl\")), sinks.stdout())\n\
         b = Dataflow(\"b\")\n\
         op.output(\"out\", op.input(\"in\", b, sources.file(\"b.jsonl\")), sinks.stdout())\n",
    );
    let done = run(dir.path(), &["check", "two.py"]);
    assert_exit_failed(&done);
    assert_stderr_has(&done, "defines 2 flows");
    assert_stderr_has(&done, "two.py:2");
    assert_stderr_has(&done, "two.py:4");
}

#[test]
fn a_call_that_fails_before_entering_the_function_points_at_the_step_definition() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "x.jsonl", "{\"a\": 1}\n");
    write(
        dir.path(),
        "peek.py",
        "from runnel import Dataflow, op, sources, sinks\n\
         flow = Dataflow(\"peek\")\n\
         s = op.input(\"in\", flow, sources.file(\"x.jsonl\"))\n\
         s = op.inspect(\"peek\", s, lambda item: None)\n\
         op.output(\"out\", s, sinks.stdout())\n",
    );
    let done = run(dir.path(), &["replay", "peek.py"]);
    assert_exit_ok(&done);
    assert_stderr_has(&done, "TypeError");
    assert_stderr_has(&done, "peek.py:4 (where the step is defined)");
    assert_eq!(
        items_of(&done, "out"),
        vec![json!({"a": 1})],
        "inspect passes the item on"
    );
}

#[test]
fn run_treats_underscore_files_in_the_flows_folder_as_helper_modules() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    write(&flows, "_units.py", "def c_to_f(c):\n    return c * 9 / 5 + 32\n");
    write(
        &flows,
        "f.py",
        "from runnel import Dataflow, op, sources, sinks\n\
         from _units import c_to_f\n\
         flow = Dataflow(\"f\")\n\
         temps = op.map(\"f\", op.input(\"in\", flow, sources.file(\"d.jsonl\")), lambda r: c_to_f(r[\"c\"]))\n\
         op.output(\"out\", temps, sinks.file(\"out.jsonl\"))\n",
    );
    write(&flows, "d.jsonl", "{\"c\": 100}\n");
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);
    let out = flows.join("out.jsonl");
    let items = agent.wait_for(Duration::from_secs(10), "the flow's output", || {
        let items = jsonl_items(&out);
        if items.is_empty() {
            Err("no output yet".to_string())
        } else {
            Ok(items)
        }
    });
    assert_eq!(items, vec![json!(212.0)]);
    assert_eq!(agent.terminate(Duration::from_secs(5)).code(), Some(0));
    let log = plain(&agent.stderr());
    assert!(
        !log.contains("_units.py"),
        "the helper module is not loaded as a flow:\n{log}"
    );
}
