//! `runnel replay` must print exactly what Bytewax 0.21.1 computes for the
//! same flow file and data.
//!
//! For each oracle flow (tests/flows/oracle_*.py) and a few seeds, the test
//! generates sensor readings (tests/oracle/gen.py), runs
//! `runnel replay FLOW --input in=DATA` and
//! `$RUNNEL_BYTEWAX_PYTHON flows/bytewax_adapter.py FLOW --input in=DATA`,
//! and compares the two outputs as multisets (tests/oracle/compare.py).
//! It also checks the data exercised the flow: its output steps are not
//! empty (late items included) and session windows merged where expected.
//!
//! On a mismatch the data and both outputs are kept under
//! `target/oracle-failures/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use runnel_tests::{
    bytewax_python, count_per_step, merged_sessions, python3, run_ok, run_with_timeout, runnel_bin, workspace_root,
};

const SEEDS: [u64; 2] = [1, 2];
const GEN_TIMEOUT: Duration = Duration::from_secs(60);
const RUNNEL_TIMEOUT: Duration = Duration::from_secs(120);
const BYTEWAX_TIMEOUT: Duration = Duration::from_secs(300);
const COMPARE_TIMEOUT: Duration = Duration::from_secs(60);

/// What one oracle flow's output must show besides matching Bytewax.
struct Expect<'a> {
    /// Output steps that must receive at least one item.
    nonempty: &'a [&'a str],
    /// `meta` output steps that must include at least one merged session.
    merged: &'a [&'a str],
}

fn keep_failure(flow: &str, seed: u64, format: &str, files: &[&Path]) -> PathBuf {
    let dir = workspace_root()
        .join("target")
        .join("oracle-failures")
        .join(format!("{}-seed{seed}-{format}", flow.trim_end_matches(".py")));
    let _ = std::fs::create_dir_all(&dir);
    for file in files {
        if let Some(name) = file.file_name() {
            let _ = std::fs::copy(file, dir.join(name));
        }
    }
    dir
}

/// Replays `flow` on generated data (in `format`: "jsonl" or "csv") with
/// runnel and with Bytewax, for every seed, and checks they agree.
fn assert_matches_bytewax(flow: &str, format: &str, expect: Expect<'_>) {
    assert_matches_bytewax_on(flow, format, &[], expect)
}

/// The same, with more arguments for the data generator (`--wide`, `--iso`).
fn assert_matches_bytewax_on(flow: &str, format: &str, gen_args: &[&str], expect: Expect<'_>) {
    let root = workspace_root();
    let flow_path = root.join("tests").join("flows").join(flow);
    assert!(flow_path.is_file(), "missing oracle flow {}", flow_path.display());
    let (runnel, bytewax, python) = (runnel_bin(), bytewax_python(), python3());

    for seed in SEEDS {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let data = dir.path().join(format!("data.{format}"));
        run_ok(
            Command::new(&python)
                .arg(root.join("tests/oracle/gen.py"))
                .arg("--seed")
                .arg(seed.to_string())
                .arg("--out")
                .arg(&data)
                .args(gen_args)
                .current_dir(&root),
            GEN_TIMEOUT,
        );
        let input = format!("in={}", data.display());

        let ours = run_ok(
            Command::new(&runnel)
                .arg("replay")
                .arg(&flow_path)
                .arg("--input")
                .arg(&input)
                .current_dir(&root),
            RUNNEL_TIMEOUT,
        );
        let theirs = run_ok(
            Command::new(&bytewax)
                .arg(root.join("flows/bytewax_adapter.py"))
                .arg(&flow_path)
                .arg("--input")
                .arg(&input)
                .current_dir(&root),
            BYTEWAX_TIMEOUT,
        );
        let ours_path = dir.path().join("runnel.out");
        let theirs_path = dir.path().join("bytewax.out");
        std::fs::write(&ours_path, &ours.stdout).expect("write runnel output");
        std::fs::write(&theirs_path, &theirs.stdout).expect("write bytewax output");

        let compared = run_with_timeout(
            Command::new(&python)
                .arg(root.join("tests/oracle/compare.py"))
                .arg(&ours_path)
                .arg(&theirs_path)
                .current_dir(&root),
            COMPARE_TIMEOUT,
        );
        if !compared.success() {
            let kept = keep_failure(
                flow,
                seed,
                format,
                &[data.as_path(), ours_path.as_path(), theirs_path.as_path()],
            );
            panic!(
                "{flow}, seed {seed}, {format}: runnel replay (A) differs from Bytewax (B); \
                 files kept in {}\n{}{}\nrunnel stderr:\n{}",
                kept.display(),
                compared.stdout_text(),
                compared.stderr_text(),
                ours.stderr_text()
            );
        }

        let replay = ours.stdout_text();
        let counts = count_per_step(&replay);
        for step in expect.nonempty {
            assert!(
                counts.get(*step).copied().unwrap_or(0) > 0,
                "{flow}, seed {seed}, {format}: output step {step:?} got no items, so the test \
                 data does not exercise it (items per step: {counts:?})"
            );
        }
        for step in expect.merged {
            assert!(
                merged_sessions(&replay, step) > 0,
                "{flow}, seed {seed}, {format}: no session window in {step:?} merged other \
                 sessions, so the test data does not exercise merging"
            );
        }
    }
}

#[test]
fn aggregate_of_every_statistic_over_tumbling_windows_matches_bytewax() {
    assert_matches_bytewax(
        "oracle_aggregate_tumbling.py",
        "jsonl",
        Expect {
            nonempty: &["down", "late", "meta"],
            merged: &[],
        },
    );
}

#[test]
fn aggregate_over_tumbling_windows_of_csv_input_matches_bytewax() {
    assert_matches_bytewax(
        "oracle_aggregate_tumbling.py",
        "csv",
        Expect {
            nonempty: &["down", "late", "meta"],
            merged: &[],
        },
    );
}

#[test]
fn aggregate_over_session_windows_with_python_key_and_clock_matches_bytewax() {
    assert_matches_bytewax(
        "oracle_aggregate_session.py",
        "jsonl",
        Expect {
            nonempty: &["down", "late", "meta"],
            merged: &[],
        },
    );
}

#[test]
fn ordered_fold_window_over_sliding_windows_matches_bytewax() {
    assert_matches_bytewax(
        "oracle_fold_sliding.py",
        "jsonl",
        Expect {
            nonempty: &["down", "late", "meta"],
            merged: &[],
        },
    );
}

const SESSION_UNORDERED: Expect<'static> = Expect {
    nonempty: &[
        "count_down",
        "count_late",
        "count_meta",
        "sum_down",
        "sum_late",
        "sum_meta",
        "max_down",
        "min_down",
        "min_meta",
        "set_down",
        "set_meta",
        "fold_down",
        "fold_late",
        "fold_meta",
    ],
    merged: &["count_meta", "sum_meta", "min_meta", "set_meta", "fold_meta"],
};

#[test]
fn unordered_session_windows_merge_sessions_like_bytewax() {
    assert_matches_bytewax("oracle_session_unordered.py", "jsonl", SESSION_UNORDERED);
}

#[test]
fn unordered_session_windows_of_csv_input_merge_sessions_like_bytewax() {
    assert_matches_bytewax("oracle_session_unordered.py", "csv", SESSION_UNORDERED);
}

#[test]
fn collect_count_max_and_min_windows_over_tumbling_windows_match_bytewax() {
    assert_matches_bytewax(
        "oracle_collect_tumbling.py",
        "jsonl",
        Expect {
            nonempty: &[
                "list_down",
                "list_late",
                "list_meta",
                "count_down",
                "count_late",
                "count_meta",
                "dict_down",
                "dict_late",
                "max_down",
                "max_late",
                "min_down",
                "min_meta",
            ],
            merged: &[],
        },
    );
}

#[test]
fn millisecond_and_iso8601_field_clocks_match_bytewax() {
    assert_matches_bytewax(
        "oracle_clock_units.py",
        "jsonl",
        Expect {
            nonempty: &["ms_down", "ms_late", "ms_meta", "iso_down", "iso_late", "iso_meta"],
            merged: &[],
        },
    );
}

#[test]
fn stateless_operators_stateful_map_and_collect_match_bytewax() {
    assert_matches_bytewax(
        "oracle_stateless.py",
        "jsonl",
        Expect {
            nonempty: &[
                "sides",
                "fields_out",
                "batched_out",
                "running_count_out",
                "digits_out",
                "batches_out",
                "down",
                "late",
                "meta",
            ],
            merged: &[],
        },
    );
}

/// Wide readings (strings with escapes, nested objects, lists) through
/// native steps only: the decoder builds just the fields they read, each
/// window keys its items itself, a one-field aggregate queues bare numbers.
/// None of that may change a result.
#[test]
fn aggregates_of_wide_readings_read_field_by_field_match_bytewax() {
    assert_matches_bytewax_on(
        "oracle_wide.py",
        "jsonl",
        &["--wide"],
        Expect {
            nonempty: &["one_down", "two_down"],
            merged: &[],
        },
    );
}

/// The same with ISO 8601 timestamps with offsets (read without chrono
/// when they have the common form).
#[test]
fn aggregates_of_wide_readings_with_iso8601_offsets_match_bytewax() {
    assert_matches_bytewax_on(
        "oracle_wide_iso.py",
        "jsonl",
        &["--wide", "--iso"],
        Expect {
            nonempty: &["one_down", "two_down"],
            merged: &[],
        },
    );
}
