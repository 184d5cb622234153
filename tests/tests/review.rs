//! Review findings: rules of runnel's behaviour that a user relies on, each
//! checked with a real process on real files.
//!
//! Some of these tests fail on purpose: each one shows a bug found in review
//! (see the comment above it). The others guard important behaviour that no
//! other test checked. Results are compared with what Bytewax 0.21.1 does
//! for the same flow (worked out from its source), or with runnel's own
//! guarantee "bad input never crashes runnel; it is logged, counted and
//! skipped" (README).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::{
    count_per_step, items_of, jsonl_items, python3, replay_in, run_ok, run_with_timeout, runnel_bin, show, sorted,
    strip_ansi, workspace_root, write_agent_config, write_file, Agent, Finished,
};
use serde_json::{json, Value};
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(60);

/// 2024-01-01T00:00:00Z as Unix seconds.
const T0: i64 = 1_704_067_200;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn assert_exit_0(done: &Finished) {
    assert_eq!(done.status.code(), Some(0), "expected exit 0:\n{}", show(done));
}

/// The counters of the summary line `flow FLOW finished: a=1 b=2`.
fn summary_counters(done: &Finished, flow_id: &str) -> BTreeMap<String, u64> {
    let stderr = strip_ansi(&done.stderr_text());
    let finished = format!("flow {flow_id} finished:");
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains(&finished))
        .unwrap_or_else(|| panic!("no summary line for flow {flow_id}:\n{}", show(done)));
    let rest = &line[line.find(&finished).unwrap() + finished.len()..];
    rest.split_whitespace()
        .filter_map(|tok| tok.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// One JSON line per (key, seconds after T0, v).
fn readings(rows: &[(&str, i64, i64)]) -> String {
    rows.iter()
        .map(|(k, dt, v)| format!("{}\n", json!({"k": k, "ts": T0 + dt, "v": v})))
        .collect()
}

const HEADER: &str = "from datetime import datetime, timedelta, timezone\n\
                      from runnel import Dataflow, op, win, sources, sinks\n\
                      ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)\n\
                      TEN_S = win.TumblingWindower(timedelta(seconds=10), ALIGN)\n\
                      def at(r):\n    return datetime.fromtimestamp(r[\"ts\"], tz=timezone.utc)\n";

fn flow(body: &str) -> String {
    format!("{HEADER}flow = Dataflow(\"review\")\nraw = op.input(\"in\", flow, sources.file(\"data.jsonl\"))\n{body}")
}

// ---------------------------------------------------------------------------
// BUG: (key, value) tuples that a Python step hands on as a Python object
// are not recognised as keyed items.
//
// When every reader of a Python step is Python, the step keeps its results
// as Python objects (graph.rs `only_python_reads`, stateless.rs `keep` and
// `pass_on`). A 2-tuple kept that way is a `Value::Py`, which
// `Value::into_keyed` rejects, so stateful_map, map_value, filter_value,
// flat_map_value, key_rm, collect and windows with a Python clock skip every
// item as "not keyed". In Bytewax a keyed stream is any stream of
// (str, value) 2-tuples.
// ---------------------------------------------------------------------------

#[test]
fn a_stream_of_pairs_made_by_op_map_is_a_keyed_stream_for_stateful_map() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "pairs = op.map(\"pair\", raw, lambda r: (r[\"k\"], r[\"v\"]))\n\
             sums = op.stateful_map(\"sum\", pairs, lambda s, v: ((s or 0) + v, (s or 0) + v))\n\
             op.output(\"out\", sums, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("b", 2, 3)]))],
    );
    assert_exit_0(&done);
    // Bytewax 0.21.1 (flows/bytewax_adapter.py) prints exactly these.
    assert_eq!(
        items_of(&done, "out"),
        vec![json!(["a", 1]), json!(["a", 3]), json!(["b", 3])],
        "{}",
        show(&done)
    );
}

#[test]
fn an_inspected_keyed_stream_still_feeds_a_window_with_a_python_clock() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "keyed = op.key_on(\"key\", raw, \"k\")\n\
             peeked = op.inspect(\"peek\", keyed, lambda step_id, item: None)\n\
             clock = win.EventClock(at, wait_for_system_duration=timedelta(seconds=0))\n\
             counts = win.fold_window(\"n\", peeked, clock, TEN_S, lambda: 0, lambda n, r: n + 1, lambda a, b: a + b)\n\
             op.output(\"out\", counts.down, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("b", 2, 3)]))],
    );
    assert_exit_0(&done);
    assert_eq!(
        sorted(items_of(&done, "out")),
        vec![json!(["a", [0, 2]]), json!(["b", [0, 1]])],
        "{}",
        show(&done)
    );
}

#[test]
fn key_rm_and_collect_keep_pairs_that_python_steps_hand_on_to_python_steps() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "keyed = op.key_on(\"key\", raw, \"k\")\n\
             kept = op.filter(\"keep\", keyed, lambda kv: True)\n\
             values = op.map(\"v\", op.key_rm(\"unkey\", kept), lambda r: r[\"v\"])\n\
             op.output(\"values\", values, sinks.stdout())\n\
             pairs = op.map(\"pair\", raw, lambda r: (r[\"k\"], r[\"v\"]))\n\
             lists = op.collect(\"lists\", pairs, timedelta(seconds=10), max_size=2)\n\
             op.output(\"lists_out\", op.map_value(\"sorted\", lists, sorted), sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("b", 2, 3)]))],
    );
    assert_exit_0(&done);
    assert_eq!(
        items_of(&done, "values"),
        vec![json!(1), json!(2), json!(3)],
        "{}",
        show(&done)
    );
    assert_eq!(
        sorted(items_of(&done, "lists_out")),
        vec![json!(["a", [1, 2]]), json!(["b", [3]])],
        "{}",
        show(&done)
    );
}

/// The same, on the oracle's generated data, against real Bytewax:
/// tests/flows/oracle_python_pairs.py. (With `op.key_on` building the pairs
/// instead, runnel and Bytewax agree on every line for seeds 1 and 2.)
#[test]
fn python_steps_that_build_or_pass_on_key_value_pairs_match_bytewax() {
    let root = workspace_root();
    let flow_path = root.join("tests/flows/oracle_python_pairs.py");
    let bytewax = std::env::var_os("RUNNEL_BYTEWAX_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-test/bin/python"));
    assert!(
        bytewax.is_file(),
        "{} does not exist: set RUNNEL_BYTEWAX_PYTHON to a Python with bytewax==0.21.1",
        bytewax.display()
    );
    for seed in [1u64, 2] {
        let dir = TempDir::new().unwrap();
        let data = dir.path().join("data.jsonl");
        run_ok(
            Command::new(python3())
                .arg(root.join("tests/oracle/gen.py"))
                .args(["--seed", &seed.to_string(), "--out"])
                .arg(&data)
                .current_dir(&root),
            TIMEOUT,
        );
        let input = format!("in={}", data.display());
        let ours = run_ok(
            Command::new(runnel_bin())
                .arg("replay")
                .arg(&flow_path)
                .args(["--input", &input])
                .current_dir(&root),
            TIMEOUT,
        );
        let theirs = run_ok(
            Command::new(&bytewax)
                .arg(root.join("flows/bytewax_adapter.py"))
                .arg(&flow_path)
                .args(["--input", &input])
                .current_dir(&root),
            Duration::from_secs(300),
        );
        let (a, b) = (dir.path().join("runnel.out"), dir.path().join("bytewax.out"));
        std::fs::write(&a, &ours.stdout).unwrap();
        std::fs::write(&b, &theirs.stdout).unwrap();
        let counts = count_per_step(&theirs.stdout_text());
        for step in [
            "running_count_out",
            "seq_out",
            "unkeyed_out",
            "list_down",
            "list_late",
            "batches_out",
        ] {
            assert!(
                counts.get(step).copied().unwrap_or(0) > 0,
                "Bytewax printed nothing for {step}"
            );
        }
        let compared = run_with_timeout(
            Command::new(python3())
                .arg(root.join("tests/oracle/compare.py"))
                .arg(&a)
                .arg(&b),
            TIMEOUT,
        );
        assert!(
            compared.success(),
            "seed {seed}: runnel replay (A) differs from Bytewax (B):\n{}\nrunnel stderr (tail):\n{}",
            compared.stdout_text().lines().take(30).collect::<Vec<_>>().join("\n"),
            strip_ansi(&ours.stderr_text())
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// BUG: stateful_map accepts only a tuple as `(updated_state, emit_value)`.
// Bytewax unpacks the result with `s, w = res`, so any 2-item sequence
// (a list, as below) works; runnel skips every item as "bad_result"
// (stateless.rs: `r.cast::<PyTuple>()`).
// ---------------------------------------------------------------------------

#[test]
fn stateful_map_accepts_a_two_item_list_as_state_and_value_like_bytewax() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "keyed = op.key_on(\"key\", raw, \"k\")\n\
             sums = op.stateful_map(\"sum\", keyed, lambda s, r: [(s or 0) + r[\"v\"], (s or 0) + r[\"v\"]])\n\
             op.output(\"out\", sums, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("b", 2, 3)]))],
    );
    assert_exit_0(&done);
    assert_eq!(
        items_of(&done, "out"),
        vec![json!(["a", 1]), json!(["a", 3]), json!(["b", 3])],
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// BUG: a key function must return exactly `str`. Bytewax checks
// `isinstance(k, str)`, so str subclasses such as a `(str, Enum)` or
// `StrEnum` member are keys; runnel (stateless.rs `cast_exact::<PyString>`)
// skips every item.
// ---------------------------------------------------------------------------

#[test]
fn a_key_function_may_return_a_str_subclass_such_as_a_str_enum_member() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "import enum\n\
             class Zone(str, enum.Enum):\n    A = \"a\"\n    B = \"b\"\n\
             keyed = op.key_on(\"zone\", raw, lambda r: Zone(r[\"k\"]))\n\
             op.output(\"out\", op.map_value(\"v\", keyed, lambda r: r[\"v\"]), sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("b", 2, 3)]))],
    );
    assert_exit_0(&done);
    assert_eq!(
        items_of(&done, "out"),
        vec![json!(["a", 1]), json!(["b", 3])],
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// BUG: a CSV header that repeats a name makes dicts with the name twice.
// Native steps (`key_on("k")`, field clocks, aggregate) read the first cell,
// Python sees the last (dict construction), and replay prints an object with
// a duplicated key. The JSON decoder keeps the last value of a repeated name,
// "like Python's json.loads"; CSV should do the same (Python's csv.DictReader
// and the Bytewax adapter keep the last cell too).
// ---------------------------------------------------------------------------

#[test]
fn a_repeated_csv_header_name_keeps_its_last_cell_for_native_and_python_steps_alike() {
    let dir = TempDir::new().unwrap();
    write_file(dir.path(), "data.csv", &format!("k,ts,k\nfirst,{T0},last\n"));
    let flow_text = format!(
        "{HEADER}flow = Dataflow(\"review\")\n\
         raw = op.input(\"in\", flow, sources.file(\"data.csv\"))\n\
         op.output(\"native\", op.key_on(\"by_field\", raw, \"k\"), sinks.stdout())\n\
         op.output(\"python\", op.key_on(\"by_fn\", raw, lambda r: r[\"k\"]), sinks.stdout())\n"
    );
    let done = replay_in(dir.path(), &flow_text, &[]);
    assert_exit_0(&done);
    let record = json!({"k": "last", "ts": T0});
    assert_eq!(
        items_of(&done, "python"),
        vec![json!(["last", record])],
        "{}",
        show(&done)
    );
    assert_eq!(
        items_of(&done, "native"),
        vec![json!(["last", record])],
        "{}",
        show(&done)
    );
    assert!(
        !done.stdout_text().contains("\"first\""),
        "replay printed an object with a duplicated name:\n{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// BUG: converting a Python result to a Rust value recurses without a depth
// limit (convert.rs `from_py`; also `to_py`, `json_form`, json::write). A
// result nested a few thousand levels deep, or one that contains itself,
// overflows the Python thread's stack and aborts the whole agent, with every
// flow in it ("thread 'runnel-python' has overflowed its stack"). Python's
// own json.dumps raises RecursionError / ValueError for these instead.
// ---------------------------------------------------------------------------

#[test]
fn a_python_result_nested_five_thousand_levels_deep_does_not_crash_runnel() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "def nest(r):\n    x = r[\"v\"]\n    for _ in range(5000):\n        x = [x]\n    return x\n\
             op.output(\"deep\", op.map(\"nest\", raw, nest), sinks.stdout())\n\
             op.output(\"plain\", op.map(\"v\", raw, lambda r: r[\"v\"]), sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2)]))],
    );
    assert_exit_0(&done);
    assert_eq!(items_of(&done, "plain"), vec![json!(1), json!(2)], "{}", show(&done));
}

#[test]
fn a_python_result_that_contains_itself_is_skipped_not_a_crash() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "def cycle(r):\n    l = [r[\"v\"]]\n    l.append(l)\n    return l\n\
             op.output(\"cyclic\", op.map(\"cycle\", raw, cycle), sinks.stdout())\n\
             op.output(\"plain\", op.map(\"v\", raw, lambda r: r[\"v\"]), sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2)]))],
    );
    assert_exit_0(&done);
    assert_eq!(items_of(&done, "plain"), vec![json!(1), json!(2)], "{}", show(&done));
}

// ---------------------------------------------------------------------------
// BUG: the file source reads a line of any length into memory
// (sources/file.rs `read_until` into an unbounded Vec; the CSV reader
// likewise). A capture with a long run of bytes without a newline (binary
// junk, a truncated write) makes runnel allocate it all: on a device without
// that much memory the process aborts ("memory allocation failed") instead
// of skipping the record. Here runnel gets 100 MB of data segment (it needs
// well under 60 MB for this flow) and a 150 MB line.
// ---------------------------------------------------------------------------

#[test]
fn a_line_longer_than_the_memory_runnel_has_is_skipped_and_counted_not_a_crash() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("data.jsonl");
    {
        let mut f = std::io::BufWriter::new(File::create(&path).unwrap());
        writeln!(f, "{}", json!({"k": "a", "ts": T0, "v": 1})).unwrap();
        let junk = vec![b'x'; 1 << 20];
        for _ in 0..150 {
            f.write_all(&junk).unwrap();
        }
        writeln!(f).unwrap();
        writeln!(f, "{}", json!({"k": "a", "ts": T0 + 1, "v": 2})).unwrap();
    }
    let flow_path = write_file(
        dir.path(),
        "flow.py",
        &flow("op.output(\"out\", op.map(\"v\", raw, lambda r: r[\"v\"]), sinks.stdout())\n"),
    );
    let done = run_with_timeout(
        Command::new("prlimit")
            .arg("--data=100000000")
            .arg(runnel_bin())
            .arg("replay")
            .arg(&flow_path)
            .current_dir(dir.path())
            .env_remove("RUNNEL_LOG"),
        TIMEOUT,
    );
    assert_exit_0(&done);
    assert_eq!(items_of(&done, "out"), vec![json!(1), json!(2)], "{}", show(&done));
    assert_eq!(
        summary_counters(&done, "review").get("in.malformed"),
        Some(&1),
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// Guarded behaviour: exceptions in window functions and Python key/clock
// functions skip the item, are counted, and the flow goes on.
// ---------------------------------------------------------------------------

#[test]
fn an_exception_in_a_window_folder_skips_that_item_and_the_window_still_emits() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "keyed = op.key_on(\"key\", raw, \"k\")\n\
             def folder(acc, r):\n    if r[\"v\"] == 2:\n        raise ValueError(\"bad reading\")\n    return acc + r[\"v\"]\n\
             sums = win.fold_window(\"sum\", keyed, win.EventClock(\"ts\", timedelta(seconds=0)), TEN_S,\n\
                                    lambda: 0, folder, lambda a, b: a + b)\n\
             op.output(\"out\", sums.down, sinks.stdout())\n\
             op.output(\"meta\", sums.meta, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("a", 2, 4), ("a", 12, 8)]))],
    );
    assert_exit_0(&done);
    assert_eq!(
        items_of(&done, "out"),
        vec![json!(["a", [0, 5]]), json!(["a", [1, 8]])],
        "{}",
        show(&done)
    );
    assert_eq!(items_of(&done, "meta").len(), 2, "{}", show(&done));
    assert_eq!(summary_counters(&done, "review").get("sum.python_errors"), Some(&1));
    assert!(
        strip_ansi(&done.stderr_text()).contains("ValueError: bad reading"),
        "{}",
        show(&done)
    );
}

#[test]
fn a_window_builder_that_raises_skips_its_item_and_other_windows_still_emit() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "keyed = op.key_on(\"key\", raw, \"k\")\n\
             calls = [0]\n\
             def builder():\n    calls[0] += 1\n    if calls[0] == 1:\n        raise RuntimeError(\"no accumulator\")\n    return []\n\
             def folder(acc, r):\n    acc.append(r[\"v\"])\n    return acc\n\
             lists = win.fold_window(\"list\", keyed, win.EventClock(\"ts\", timedelta(seconds=0)), TEN_S,\n\
                                     builder, folder, lambda a, b: a + b)\n\
             op.output(\"out\", lists.down, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("b", 2, 3)]))],
    );
    assert_exit_0(&done);
    // The first item's window gets its accumulator from the builder's second call.
    assert_eq!(
        sorted(items_of(&done, "out")),
        vec![json!(["a", [0, [2]]]), json!(["b", [0, [3]]])],
        "{}",
        show(&done)
    );
    assert_eq!(summary_counters(&done, "review").get("list.python_errors"), Some(&1));
}

#[test]
fn a_session_merger_that_raises_keeps_the_target_sessions_state_and_the_flow_goes_on() {
    let dir = TempDir::new().unwrap();
    // Gap 5 s, wait 60 s, unordered: 0 and 10 open two sessions; 5 joins
    // the first, which then lies within the gap of the second: they merge.
    let done = replay_in(
        dir.path(),
        &flow(
            "keyed = op.key_on(\"key\", raw, \"k\")\n\
             def merger(a, b):\n    raise RuntimeError(\"cannot merge\")\n\
             sums = win.fold_window(\"sum\", keyed, win.EventClock(\"ts\", timedelta(seconds=60)),\n\
                                    win.SessionWindower(timedelta(seconds=5)),\n\
                                    lambda: 0, lambda acc, r: acc + r[\"v\"], merger, ordered=False)\n\
             op.output(\"out\", sums.down, sinks.stdout())\n\
             op.output(\"meta\", sums.meta, sinks.stdout())\n",
        ),
        &[(
            "data.jsonl",
            &readings(&[("a", 0, 1), ("a", 10, 2), ("a", 5, 4), ("b", 0, 7)]),
        )],
    );
    assert_exit_0(&done);
    let out = sorted(items_of(&done, "out"));
    assert_eq!(out, vec![json!(["a", [0, 5]]), json!(["b", [0, 7]])], "{}", show(&done));
    let meta = items_of(&done, "meta");
    assert!(
        meta.iter().any(|m| m[0] == "a" && m[1][1]["merged_ids"] == json!([1])),
        "{}",
        show(&done)
    );
    assert_eq!(summary_counters(&done, "review").get("sum.python_errors"), Some(&1));
}

#[test]
fn a_python_key_that_returns_a_non_str_skips_the_item_and_counts_it() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "keys = {\"a\": \"a\", \"b\": 7, \"c\": None}\n\
             keyed = op.key_on(\"key\", raw, lambda r: keys[r[\"k\"]])\n\
             op.output(\"out\", keyed, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("b", 1, 2), ("c", 2, 3)]))],
    );
    assert_exit_0(&done);
    assert_eq!(items_of(&done, "out").len(), 1, "{}", show(&done));
    assert_eq!(
        summary_counters(&done, "review").get("key.skipped.bad_result"),
        Some(&2)
    );
}

#[test]
fn a_python_timestamp_getter_returning_a_naive_datetime_or_a_number_skips_the_item_and_counts_it() {
    let dir = TempDir::new().unwrap();
    let done = replay_in(
        dir.path(),
        &flow(
            "def ts(r):\n    if r[\"v\"] == 1:\n        return datetime(2024, 1, 1)\n    if r[\"v\"] == 2:\n        return r[\"ts\"]\n    return at(r)\n\
             keyed = op.key_on(\"key\", raw, \"k\")\n\
             n = win.count_window(\"n\", raw, win.EventClock(ts, timedelta(seconds=0)), TEN_S, \"k\")\n\
             op.output(\"out\", n.down, sinks.stdout())\n",
        ),
        &[("data.jsonl", &readings(&[("a", 0, 1), ("a", 1, 2), ("a", 2, 3)]))],
    );
    assert_exit_0(&done);
    assert_eq!(items_of(&done, "out"), vec![json!(["a", [0, 1]])], "{}", show(&done));
    assert_eq!(
        summary_counters(&done, "review").get("n.skipped.bad_timestamp"),
        Some(&2)
    );
}

#[test]
fn timestamps_at_both_ends_of_the_datetime_range_get_exact_window_ids_without_overflow() {
    let dir = TempDir::new().unwrap();
    // Aligned to 0001-01-01; readings at the first and the last second
    // Python's datetime can hold.
    let (first, last) = (-62_135_596_800i64, 253_402_300_799i64);
    let data = format!(
        "{}\n{}\n",
        json!({"k": "a", "ts": first, "v": 1}),
        json!({"k": "a", "ts": last, "v": 2})
    );
    let done = replay_in(
        dir.path(),
        &format!(
            "{HEADER}flow = Dataflow(\"review\")\n\
             raw = op.input(\"in\", flow, sources.file(\"data.jsonl\"))\n\
             w = win.TumblingWindower(timedelta(seconds=10), datetime(1, 1, 1, tzinfo=timezone.utc))\n\
             n = win.count_window(\"n\", raw, win.EventClock(\"ts\", timedelta(days=20000 * 365)), w, \"k\")\n\
             op.output(\"out\", n.down, sinks.stdout())\n\
             op.output(\"meta\", n.meta, sinks.stdout())\n"
        ),
        &[("data.jsonl", &data)],
    );
    assert_exit_0(&done);
    let last_id = (last - first) / 10;
    assert_eq!(
        sorted(items_of(&done, "out")),
        sorted(vec![json!(["a", [0, 1]]), json!(["a", [last_id, 1]])]),
        "{}",
        show(&done)
    );
    let meta = sorted(items_of(&done, "meta"));
    assert_eq!(
        meta[0][1][1]["open_time"],
        "0001-01-01T00:00:00+00:00",
        "{}",
        show(&done)
    );
    assert_eq!(
        meta[1][1][1]["open_time"],
        "9999-12-31T23:59:50+00:00",
        "{}",
        show(&done)
    );
}

// ---------------------------------------------------------------------------
// Live mode (`runnel run`)
// ---------------------------------------------------------------------------

/// The write end of a FIFO, held open so its reader never sees end of input.
struct Fifo {
    file: File,
}

impl Fifo {
    fn create(path: &Path) -> Fifo {
        let made = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
        assert!(made.success(), "mkfifo {} failed", path.display());
        let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
        Fifo { file }
    }

    fn send(&mut self, line: &Value) {
        self.file.write_all(format!("{line}\n").as_bytes()).unwrap();
        self.file.flush().unwrap();
    }
}

// BUG: SIGTERM does not stop the agent while a flow's Python function is
// running. `agent::run` joins every engine thread after signalling stop,
// and an engine thread waiting for its Python job (a slow HTTP call, a
// sleep) only looks at the stop signal after the job returns. systemd then
// has to SIGKILL the agent, and a second SIGTERM does nothing.
#[test]
fn sigterm_stops_the_agent_within_seconds_while_a_python_function_is_still_running() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    write_file(&flows, "data.jsonl", &readings(&[("a", 0, 1)]));
    write_file(
        &flows,
        "slow.py",
        "import pathlib, time\n\
         from runnel import Dataflow, op, sources, sinks\n\
         def slow(r):\n    pathlib.Path(__file__).with_name(\"started\").touch()\n    time.sleep(60)\n    return r\n\
         flow = Dataflow(\"slow\")\n\
         raw = op.input(\"in\", flow, sources.file(\"data.jsonl\"))\n\
         op.output(\"out\", op.map(\"slow\", raw, slow), sinks.file(\"out.jsonl\"))\n",
    );
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);
    let started = flows.join("started");
    agent.wait_for(Duration::from_secs(10), "the slow function to start", || {
        if started.exists() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let status = agent.terminate(Duration::from_secs(10));
    // The sleeping function is interrupted, its item abandoned: exit 1 (issue 9).
    assert_eq!(status.code(), Some(1), "{}", agent.stderr());
    assert!(agent
        .stderr()
        .contains("abandoning: flow slow step \"slow\" (interrupted)"));
}

// BUG (live semantics): op.collect's timeout counts from the list's first
// item (collect.rs keeps the Instant of the first value). In Bytewax 0.21.1
// `_CollectLogic.on_item` sets `timeout_at = now + timeout` on every item,
// so a list is emitted `timeout` after its *last* item: a key whose items
// keep coming closer together than `timeout` is emitted only at max_size.
#[test]
fn collect_timeout_restarts_with_every_item_as_in_bytewax() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    write_file(
        &flows,
        "live.py",
        "from datetime import timedelta\n\
         from runnel import Dataflow, op, sources, sinks\n\
         flow = Dataflow(\"live\")\n\
         raw = op.input(\"in\", flow, sources.file(\"in.fifo\", decode=\"jsonl\"))\n\
         keyed = op.key_on(\"key\", raw, \"k\")\n\
         lists = op.collect(\"lists\", op.map_value(\"v\", keyed, lambda r: r[\"v\"]), timedelta(seconds=1.5), max_size=100)\n\
         op.output(\"out\", lists, sinks.file(\"out.jsonl\"))\n",
    );
    let mut fifo = Fifo::create(&flows.join("in.fifo"));
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log(Duration::from_secs(10), "starting flow");
    let out = flows.join("out.jsonl");

    // Six values, one every 0.5 s: never 1.5 s without a new one.
    let start = Instant::now();
    for i in 0..6 {
        thread::sleep((start + Duration::from_millis(500 * i)).saturating_duration_since(Instant::now()));
        fifo.send(&json!({"k": "a", "ts": T0, "v": i}));
    }
    // 0.3 s after the last value: Bytewax's timeout is 1.2 s away still.
    thread::sleep((start + Duration::from_millis(2800)).saturating_duration_since(Instant::now()));
    let early = jsonl_items(&out);
    let all = agent.wait_for(Duration::from_secs(6), "a list in out.jsonl", || {
        let items = jsonl_items(&out);
        if items.is_empty() {
            Err("no list yet".into())
        } else {
            Ok(items)
        }
    });
    assert_eq!(
        (early, all),
        (vec![], vec![json!(["a", [0, 1, 2, 3, 4, 5]])]),
        "(lists 2.8 s after the first value, lists once the values stopped): \
         the list should come 1.5 s after its last value, whole\n{}",
        agent.stderr()
    );
    let _ = agent.terminate(Duration::from_secs(5));
    drop(fifo);
}

// BUG (live): timers starve while input keeps arriving. The engine loop
// (graph.rs `engine_main`) selects `biased` on stop, then input, then the
// deadline sleep, and `Engine::tick` runs only when the sleep branch wins;
// `on_batch` flushes only the keys in the batch. While the input channel
// always holds a batch (the engine is busy: a Python step, a burst, a
// backlog), an idle key's windows, ordered queues and op.collect timeouts
// never come due. Bytewax checks its notify times on every activation.
#[test]
fn an_idle_keys_window_closes_on_time_while_other_keys_keep_the_engine_busy() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    write_file(
        &flows,
        "live.py",
        "import time\n\
         from datetime import datetime, timedelta, timezone\n\
         from runnel import Dataflow, op, win, sources, sinks\n\
         flow = Dataflow(\"live\")\n\
         raw = op.input(\"in\", flow, sources.file(\"in.fifo\", decode=\"jsonl\"))\n\
         busy = op.map(\"busy\", raw, lambda r: (time.sleep(0.0002), r)[1])\n\
         keyed = op.key_on(\"by_sensor\", busy, \"sensor\")\n\
         clock = win.EventClock(\"ts\", wait_for_system_duration=timedelta(seconds=0), unit=\"s\")\n\
         windower = win.TumblingWindower(timedelta(seconds=2), datetime(2024, 1, 1, tzinfo=timezone.utc))\n\
         stats = win.aggregate(\"stats\", keyed, clock, windower, {\"temp\": [\"count\"]})\n\
         op.output(\"out\", stats.down, sinks.file(\"out.jsonl\"))\n",
    );
    let mut fifo = Fifo::create(&flows.join("in.fifo"));
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log(Duration::from_secs(10), "starting flow");
    let out = flows.join("out.jsonl");
    let b_window = json!(["b", [0, {"temp": {"count": 1}}]]);

    // Sensor b reads once at T0+1: its window [T0, T0+2) is due after 1 s
    // of idleness (wait 0). Sensor a then keeps the engine busy for 4 s.
    fifo.send(&json!({"sensor": "b", "ts": T0 + 1, "temp": 1.0}));
    let sent = Instant::now();
    let a_lines: String = (0..100)
        .map(|_| format!("{}\n", json!({"sensor": "a", "ts": T0 + 100, "temp": 2.0})))
        .collect();
    let mut closed_after = None;
    while sent.elapsed() < Duration::from_secs(4) {
        fifo.file.write_all(a_lines.as_bytes()).unwrap();
        if closed_after.is_none() && jsonl_items(&out).contains(&b_window) {
            closed_after = Some(sent.elapsed());
        }
    }
    agent.assert_running();
    assert!(
        closed_after.is_some_and(|t| t < Duration::from_millis(2500)),
        "b's window is due 1 s after its reading; with other keys' input arriving all along it \
         was {} (out.jsonl: {:?})",
        match closed_after {
            Some(t) => format!("emitted after {t:?}"),
            None => "not emitted within 4 s".to_string(),
        },
        jsonl_items(&out).iter().filter(|v| v[0] == "b").collect::<Vec<_>>()
    );
    let _ = agent.terminate(Duration::from_secs(10));
    drop(fifo);
}
