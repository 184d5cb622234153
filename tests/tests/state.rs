//! Durable state under `runnel run`: real redb files, real `kill -9`, real
//! restarts. Each test asserts on what a reader of the flow's outputs sees
//! (the sink files), compared with an uninterrupted run of the same flow on
//! the same data, never on runnel's own counters.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use runnel_tests::{jsonl_items, write_agent_config_with, write_file, Agent, Fifo};
use serde_json::{json, Value};
use tempfile::TempDir;

const T0: f64 = 1_704_067_200.0;
const STOP_WITHIN: Duration = Duration::from_secs(5);

use runnel_tests::Rng;

/// Readings shaped like a deployment's: 25 sensors, seven fields (a short
/// string, a nested object, a list), a second of per-key jitter, and 0.5 %
/// of readings 20-40 s late.
fn readings(n: usize, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut out = String::new();
    for i in 0..n {
        let key = format!("s{:02}", rng.next() % 25);
        let mut t = T0 + i as f64 * 0.01 + (rng.unit() * 2.0 - 1.0);
        if rng.unit() < 0.005 {
            t -= 20.0 + rng.unit() * 20.0;
        }
        let v = json!({
            "id": key,
            "t": (t * 1000.0).round() / 1000.0,
            "temp": ((15.0 + rng.unit() * 10.0) * 100.0).round() / 100.0,
            "rh": 30 + rng.next() % 40,
            "fw": "v1.2.3",
            "loc": {"x": 1, "y": 2},
            "tags": ["a", "b"],
        });
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

/// Every kind of state: native aggregates (with percentiles and first/last),
/// a Python fold over merging sessions with a Python clock, `stateful_map`,
/// `collect`, and the ordered queues under jitter. `slow` makes each batch
/// take a while, so that kills land in the middle of the input.
fn crash_flow(sleep_s: f64) -> String {
    format!(
        r#"
import time
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("crash")
inp = op.input("in", flow, sources.file("../data.jsonl"))
slow = op.flat_map_batch("slow", inp, lambda xs: (time.sleep({sleep_s}), xs)[1])
keyed = op.key_on("by_id", slow, "id")
clock = win.EventClock("t", wait_for_system_duration=timedelta(seconds=5), unit="s")
tw = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
agg = win.aggregate("agg", keyed, clock, tw, {{"temp": ["count", "mean", "max", "p90"], "rh": ["first", "last"]}})
op.output("agg_out", agg.down, sinks.file("../out/agg.jsonl"))
op.output("late_out", agg.late, sinks.file("../out/late.jsonl"))
pyclock = win.EventClock(lambda r: datetime.fromtimestamp(r["t"], tz=timezone.utc),
                         wait_for_system_duration=timedelta(seconds=5))
sess = win.SessionWindower(gap=timedelta(seconds=0.2))
fold = win.fold_window("fold", keyed, pyclock, sess, lambda: {{"n": 0, "s": 0.0}},
                       lambda acc, r: {{"n": acc["n"] + 1, "s": round(acc["s"] + r["temp"], 2)}},
                       lambda a, b: {{"n": a["n"] + b["n"], "s": round(a["s"] + b["s"], 2)}})
op.output("fold_out", fold.down, sinks.file("../out/fold.jsonl"))
op.output("meta_out", fold.meta, sinks.file("../out/meta.jsonl"))
def count(state, r):
    state = (state or 0) + 1
    return (state, state) if state % 50 else (None, state)
op.output("sm_out", op.stateful_map("running", keyed, count), sinks.file("../out/sm.jsonl"))
col = op.collect("col", op.map_value("temps", keyed, lambda r: r["temp"]), timeout=timedelta(seconds=60), max_size=7)
op.output("col_out", col, sinks.file("../out/col.jsonl"))
"#
    )
}

const OUTPUTS: [&str; 6] = ["agg", "late", "fold", "meta", "sm", "col"];

/// `dir/runnel.toml` with flows from `dir/flows`, state in `dir/state`.
fn config(dir: &Path, extra: &str) -> PathBuf {
    write_agent_config_with(dir, &dir.join("flows"), extra)
}

/// The lines of each output file, sorted (timers fire in an order that
/// depends on timing; what was written does not).
fn outputs(dir: &Path) -> Vec<(String, Vec<String>)> {
    OUTPUTS
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join("out").join(format!("{name}.jsonl"))).unwrap_or_default();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            (name.to_string(), lines)
        })
        .collect()
}

fn setup(flow: &str, data: &str, extra: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new().expect("temp dir");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    write_file(&dir.join("flows"), "crash.py", flow);
    write_file(dir, "data.jsonl", data);
    let cfg = config(dir, extra);
    (tmp, cfg)
}

const ENDED: &str = "every input has ended";

/// Run to the end of the input, then stop with SIGTERM.
fn run_to_end(dir: &Path, cfg: &Path, log: &str) -> String {
    let mut agent = Agent::start_logging_to(dir, cfg, log);
    agent.wait_for_log(Duration::from_secs(120), ENDED);
    let status = agent.terminate(STOP_WITHIN);
    assert!(status.success(), "runnel run failed:\n{}", agent.stderr());
    agent.stderr()
}

#[test]
fn a_file_flow_killed_at_random_moments_ends_with_the_outputs_of_an_uninterrupted_run() {
    let data = readings(40_000, 7);
    let flow = crash_flow(0.12);
    let (ref_tmp, ref_cfg) = setup(&flow, &data, "snapshot_interval = 0.5\n");
    run_to_end(ref_tmp.path(), &ref_cfg, "stderr.txt");
    let reference = outputs(ref_tmp.path());
    for (name, lines) in &reference {
        assert!(!lines.is_empty(), "the uninterrupted run wrote no {name} output");
    }

    let (tmp, cfg) = setup(&flow, &data, "snapshot_interval = 0.5\n");
    let dir = tmp.path();
    let mut rng = Rng(0x5eed);
    let mut kills_mid_input = 0;
    for round in 0..24 {
        let mut agent = Agent::start_logging_to(dir, &cfg, &format!("run{round}.txt"));
        agent.wait_for_log(Duration::from_secs(30), "starting flow");
        // Anywhere from right after the start to well into the input.
        thread::sleep(Duration::from_millis(rng.next() % 900));
        let ended = agent.stderr().contains(ENDED);
        agent.kill9();
        if !ended {
            kills_mid_input += 1;
        }
    }
    assert!(
        kills_mid_input >= 20,
        "only {kills_mid_input} kills landed before the input ended; the test needs a slower flow"
    );
    let last = run_to_end(dir, &cfg, "final.txt");
    let restored = (0..24)
        .filter(|r| {
            std::fs::read_to_string(dir.join(format!("run{r}.txt"))).is_ok_and(|t| t.contains("restored its state"))
        })
        .count();
    assert!(restored >= 15, "only {restored} restarts restored state");
    assert!(
        last.contains("restored its state"),
        "the last run did not restore:\n{last}"
    );

    let got = outputs(dir);
    for ((name, want), (_, have)) in reference.iter().zip(&got) {
        if want != have {
            let missing: Vec<&String> = want.iter().filter(|l| !have.contains(l)).take(3).collect();
            let extra: Vec<&String> = have.iter().filter(|l| !want.contains(l)).take(3).collect();
            panic!(
                "{name}: {} lines after {kills_mid_input} kills, {} uninterrupted; missing e.g. {missing:?}, extra e.g. {extra:?}",
                have.len(),
                want.len()
            );
        }
    }
}

fn window_flow(length_s: u32) -> String {
    format!(
        r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("live")
keyed = op.key_on("k", op.input("in", flow, sources.file("../in.fifo")), "id")
clock = win.EventClock("t", wait_for_system_duration=timedelta(seconds=0), unit="s")
def tw(s):
    return win.TumblingWindower(length=timedelta(seconds=s), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
op.output("sums", win.aggregate("sum", keyed, clock, tw({length_s}), {{"x": ["count", "sum"]}}).down, sinks.file("../out/sums.jsonl"))
op.output("counts", win.count_window("count", op.key_rm("unkey", keyed), clock, tw(3600), "id").down, sinks.file("../out/counts.jsonl"))
"#
    )
}

fn reading(id: &str, t: f64, x: i64) -> Value {
    json!({"id": id, "t": t, "x": x})
}

/// Wait until `path` has at least `n` JSON lines.
fn lines_at_least(agent: &mut Agent, path: &Path, n: usize) -> Vec<Value> {
    agent.wait_for(
        Duration::from_secs(15),
        &format!("{n} lines in {}", path.display()),
        || {
            let items = jsonl_items(path);
            if items.len() >= n {
                Ok(items)
            } else {
                Err(format!("{} lines", items.len()))
            }
        },
    )
}

#[test]
fn windows_open_at_sigterm_continue_after_the_restart_and_a_changed_step_starts_empty() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    write_file(&dir.join("flows"), "live.py", &window_flow(60));
    let cfg = config(dir, "");
    let mut fifo = Fifo::create(&dir.join("in.fifo"));

    let mut agent = Agent::start_logging_to(dir, &cfg, "run1.txt");
    agent.wait_for_log(Duration::from_secs(30), "starting flow");
    // Two readings in the first minute (window 0), which stays open.
    fifo.send_json(&[reading("a", T0 + 1.0, 1), reading("a", T0 + 2.0, 2)]);
    thread::sleep(Duration::from_millis(300));
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());

    let mut agent = Agent::start_logging_to(dir, &cfg, "run2.txt");
    agent.wait_for_log(Duration::from_secs(30), "restored its state");
    // One more reading in window 0, then one in minute 2 closes window 0.
    fifo.send_json(&[reading("a", T0 + 3.0, 4), reading("a", T0 + 61.0, 8)]);
    let sums = lines_at_least(&mut agent, &dir.join("out/sums.jsonl"), 1);
    assert_eq!(
        sums[0],
        json!(["a", [0, {"x": {"count": 3, "sum": 7.0}}]]),
        "{}",
        agent.stderr()
    );
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());

    // The window length of "sum" changes; "count" stays as it was.
    write_file(&dir.join("flows"), "live.py", &window_flow(30));
    let mut agent = Agent::start_logging_to(dir, &cfg, "run3.txt");
    agent.wait_for_log(Duration::from_secs(30), "restored its state");
    let log = agent.stderr();
    assert!(
        log.contains("step \"sum\": the step changed since its state was saved") && log.contains("set aside"),
        "no set-aside line for the changed step:\n{log}"
    );
    assert!(!log.contains("step \"count\": the step changed"), "{log}");
    // Close the hour of "count": its 5 readings span all three runs.
    fifo.send_json(&[reading("a", T0 + 3601.0, 16)]);
    let counts = lines_at_least(&mut agent, &dir.join("out/counts.jsonl"), 1);
    assert_eq!(
        counts[0],
        json!(["a", [0, 4]]),
        "count kept its state:\n{}",
        agent.stderr()
    );
    // "sum" started empty: had it kept its 60 s window 1 (the reading at
    // T0+61), that would close now; instead its next result is the 30 s
    // window 120 of the reading at T0+3601.
    fifo.send_json(&[reading("a", T0 + 7300.0, 32)]);
    let sums = lines_at_least(&mut agent, &dir.join("out/sums.jsonl"), 2);
    assert_eq!(
        sums[1],
        json!(["a", [120, {"x": {"count": 1, "sum": 16.0}}]]),
        "the changed step must not have kept the 60 s window of T0+61:\n{}",
        agent.stderr()
    );
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());
}

#[test]
fn a_damaged_state_file_is_moved_aside_and_runnel_starts_fresh() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    write_file(&dir.join("flows"), "live.py", &window_flow(60));
    std::fs::write(dir.join("state/runnel.redb"), vec![0x5a; 64 * 1024]).unwrap();
    let cfg = config(dir, "");
    let mut fifo = Fifo::create(&dir.join("in.fifo"));
    let mut agent = Agent::start(dir, &cfg);
    agent.wait_for_log(Duration::from_secs(30), "starting flow");
    let log = agent.stderr();
    assert!(
        log.contains("cannot be read") && log.contains("runnel.redb.damaged-"),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("runnel.redb.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for a post-mortem");
    // And the fresh store works: a window closes and its result is written.
    fifo.send_json(&[reading("a", T0 + 1.0, 1), reading("a", T0 + 61.0, 2)]);
    let sums = lines_at_least(&mut agent, &dir.join("out/sums.jsonl"), 1);
    assert_eq!(sums[0], json!(["a", [0, {"x": {"count": 1, "sum": 1.0}}]]));
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());
}

const CHURN_FLOW: &str = r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("churn")
keyed = op.key_on("k", op.input("in", flow, sources.file("../in.fifo")), "id")
clock = win.EventClock("t", wait_for_system_duration=timedelta(seconds=0), unit="s")
tw = win.TumblingWindower(length=timedelta(seconds=1), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
op.output("sums", win.aggregate("sum", keyed, clock, tw, {"x": ["count", "sum"]}).down, sinks.file("../out/sums.jsonl"))
"#;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_churn_of_100000_short_lived_keys_leaves_neither_memory_nor_the_state_file_growing() {
    // Eight rounds of 100,000 keys, each seen once.
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    write_file(&dir.join("flows"), "live.py", CHURN_FLOW);
    let cfg = config(dir, "snapshot_interval = 0.5\n");
    let mut fifo = Fifo::create(&dir.join("in.fifo"));
    let mut agent = Agent::start(dir, &cfg);
    agent.wait_for_log(Duration::from_secs(30), "starting flow");
    let redb = dir.join("state/runnel.redb");
    let mut after = Vec::new();
    for round in 0..8u32 {
        // 100,000 keys seen once each; their 1 s windows close on the
        // timer (the watermark of an idle key advances with time).
        let t = T0 + round as f64 * 10.0;
        for chunk in 0..10 {
            let lines: Vec<Value> = (0..10_000)
                .map(|i| reading(&format!("r{round}-{chunk}-{i}"), t, 1))
                .collect();
            fifo.send_json(&lines);
        }
        let want = (round as usize + 1) * 100_000;
        agent.wait_for(Duration::from_secs(60), "every window closed", || {
            let n = std::fs::read_to_string(dir.join("out/sums.jsonl"))
                .unwrap_or_default()
                .lines()
                .count();
            if n >= want {
                Ok(())
            } else {
                Err(format!("{n} of {want}"))
            }
        });
        // Two snapshot intervals: the deletes of the closed keys are committed.
        thread::sleep(Duration::from_millis(1500));
        after.push((
            std::fs::metadata(&redb).map(|m| m.len()).unwrap_or(0),
            rss_kib(agent.pid()),
        ));
    }
    // redb reuses freed pages (and trims free space at the end of the file),
    // so the file's size goes up and down with what is open at the moment
    // of the sample (seen: 15 to 51 MB over the rounds after a first of 27 to
    // 36), and RSS settles after the first rounds (fragmentation: up to 1.5x
    // the first round under a loaded machine). Keeping the closed keys would
    // grow both with every round: by the last four rounds 5 to 8 times the
    // first round's file, and hundreds of MiB more RSS.
    let (file_first, rss_first) = after[0];
    let file_late = after[4..].iter().map(|x| x.0).max().unwrap_or(0);
    let rss_late = after[4..].iter().map(|x| x.1).max().unwrap_or(0);
    assert!(
        file_late <= file_first * 5 / 2 + (1 << 20),
        "state file grew from {file_first} (first round) to {file_late} bytes over eight rounds of 100,000 keys ({after:?})"
    );
    assert!(
        rss_late <= rss_first * 2 + 8192,
        "RSS grew from {rss_first} (first round) to {rss_late} KiB over eight rounds of 100,000 keys ({after:?})"
    );
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());
    // Nothing of the 300,000 keys is left to restore.
    let mut agent = Agent::start_logging_to(dir, &cfg, "restart.txt");
    agent.wait_for_log(Duration::from_secs(30), "starting flow");
    thread::sleep(Duration::from_millis(500));
    let log = agent.stderr();
    assert!(
        !log.contains("restored its state") || log.contains("restored its state: 0 key(s), 0 open window(s)"),
        "closed keys were restored:\n{log}"
    );
    assert!(agent.terminate(STOP_WITHIN).success());
    drop(fifo);
}

#[test]
fn check_warns_about_an_accumulator_that_cannot_be_pickled() {
    let tmp = TempDir::new().unwrap();
    let flow = |builder: &str| {
        format!(
            r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks
flow = Dataflow("p")
keyed = op.key_on("k", op.input("in", flow, sources.file("in.jsonl")), "id")
clock = win.EventClock("t", wait_for_system_duration=timedelta(seconds=0), unit="s")
tw = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
w = win.fold_window("acc", keyed, clock, tw, {builder}, lambda a, x: a, lambda a, b: a)
op.output("out", w.down, sinks.stdout())
"#
        )
    };
    let bad = write_file(tmp.path(), "bad.py", &flow(r#"lambda: {"f": lambda x: x}"#));
    let good = write_file(tmp.path(), "good.py", &flow(r#"lambda: {"n": 0}"#));
    // A class the flow file defines pickles too (the file is a module of its own).
    let class = write_file(
        tmp.path(),
        "class.py",
        &flow("Acc").replace(
            "flow = Dataflow",
            "class Acc:\n    n = 0
flow = Dataflow",
        ),
    );
    let run = |path: &Path| {
        runnel_tests::run_ok(
            runnel_tests::runnel_command(tmp.path()).arg("check").arg(path),
            Duration::from_secs(30),
        )
    };
    let done = run(&bad);
    assert!(
        done.stderr_text().contains("step \"acc\"") && done.stderr_text().contains("cannot be pickled"),
        "{}",
        done.stderr_text()
    );
    for path in [&good, &class] {
        let done = run(path);
        assert!(!done.stderr_text().contains("pickled"), "{}", done.stderr_text());
    }
}

#[test]
fn skipped_lines_at_the_end_of_a_file_are_not_read_again_after_a_restart() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    write_file(
        &dir.join("flows"),
        "tail.py",
        r#"
from runnel import Dataflow, op, sources, sinks
flow = Dataflow("tail")
op.output("out", op.input("in", flow, sources.file("../tail.jsonl")), sinks.file("../out/tail.jsonl"))
"#,
    );
    // 1,024 good lines fill a batch, which goes out before the bad lines are
    // read: the end of the input then has nothing but its position to send.
    let good: String = (0..1024).map(|i| format!("{{\"a\": {i}}}\n")).collect();
    write_file(dir, "tail.jsonl", &format!("{good}not json\n{{broken\n"));
    let cfg = config(dir, "");
    let first = run_to_end(dir, &cfg, "run1.txt");
    assert!(first.contains("record skipped"), "{first}");
    let second = run_to_end(dir, &cfg, "run2.txt");
    assert!(
        !second.contains("record skipped"),
        "the bad lines were read again:\n{second}"
    );
    let out = jsonl_items(&dir.join("out/tail.jsonl"));
    assert_eq!(out.len(), 1024, "every good line once");
    assert_eq!(out[1023], json!({"a": 1023}));
}
