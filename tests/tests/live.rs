//! Live-mode time in `runnel run`, with real processes and real files.
//!
//! Each test starts the agent on a flow that reads a named pipe (FIFO). The
//! test holds the FIFO open for writing for as long as it runs, so the input
//! never ends and only the engine's timer can close windows. Event times are
//! in January 2024, far from the wall clock, so a watermark that followed the
//! wall clock would be seen at once.
//!
//! Linux only: FIFOs are made with `mkfifo`, opened read-write (which on
//! Linux neither blocks nor counts as a second reader that takes data, since
//! the test never reads), and CPU time comes from `/proc/PID/stat`.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::{cpu_seconds, jsonl_items, write_agent_config, write_file, Agent, Fifo};
use serde_json::{json, Value};
use tempfile::TempDir;

/// 2024-01-01T00:00:00Z as Unix seconds: every windower here is aligned to it.
const T0: f64 = 1_704_067_200.0;

/// How long an agent may take to stop after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A reading of sensor "a" as one JSON line, `ts` in Unix seconds.
fn reading(ts: f64, temp: f64) -> Value {
    json!({"sensor": "a", "ts": ts, "temp": temp})
}

fn line(v: &Value) -> String {
    format!("{v}\n")
}

/// A flow "live": readings from the FIFO `in.fifo`, keyed by "sensor",
/// tumbling windows of `length_s` seconds aligned to T0 on an event clock
/// reading "ts" (Unix seconds) with `wait_s` seconds of wait; count and mean
/// of "temp" go to out.jsonl, late readings to late.jsonl.
fn fifo_window_flow(length_s: u32, wait_s: u32) -> String {
    format!(
        r#"from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("live")
readings = op.input("in", flow, sources.file("in.fifo", decode="jsonl"))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds={wait_s}), unit="s")
windower = win.TumblingWindower(timedelta(seconds={length_s}), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("stats", keyed, clock, windower, {{"temp": ["count", "mean"]}})
op.output("out", stats.down, sinks.file("out.jsonl"))
op.output("late", stats.late, sinks.file("late.jsonl"))
"#
    )
}

/// Start an agent whose flows folder `dir/flows` holds `flow_text` as
/// live.py and the FIFO in.fifo, which the returned `Fifo` holds open; waits
/// until the flow has started.
fn start_live(dir: &Path, flow_text: &str) -> (Agent, Fifo, PathBuf) {
    let flows = dir.join("flows");
    write_file(&flows, "live.py", flow_text);
    let fifo = Fifo::create(&flows.join("in.fifo"));
    let config = write_agent_config(dir, &flows);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(10), "starting flow");
    (agent, fifo, flows)
}

/// The items of the JSON lines file `path` once it has at least `n`.
fn at_least(path: &Path, n: usize) -> Result<Vec<Value>, String> {
    let items = jsonl_items(path);
    if items.len() >= n {
        Ok(items)
    } else {
        Err(format!(
            "{} has {} item(s), expected {n}: {items:?}",
            path.display(),
            items.len()
        ))
    }
}

/// SIGTERM; asserts exit 0 and returns the log.
fn stop_cleanly(agent: &mut Agent) -> String {
    let status = agent.terminate(STOP_WITHIN);
    let log = agent.stderr();
    assert_eq!(status.code(), Some(0), "exit after SIGTERM ({status}):\n{log}");
    log
}

/// Most CPU an idle agent may use in the two seconds measured.
const IDLE_CPU_BUDGET_S: f64 = 0.2;

/// Let a started agent settle for a second, then measure its CPU over two
/// seconds; asserts it stayed under the idle budget.
fn assert_idles_without_cpu(agent: &mut Agent, situation: &str) {
    thread::sleep(Duration::from_secs(1));
    agent.assert_running();
    let before = cpu_seconds(agent.pid());
    let from = Instant::now();
    thread::sleep(Duration::from_secs(2));
    agent.assert_running();
    let used = cpu_seconds(agent.pid()) - before;
    let over = from.elapsed();
    assert!(
        used < IDLE_CPU_BUDGET_S,
        "{situation}: the agent used {used:.2} s of CPU in {over:.1?} of idleness (budget {IDLE_CPU_BUDGET_S} s); \
         it should sleep until its next deadline, not poll.\nstderr:\n{}",
        agent.stderr()
    );
}

// ---------------------------------------------------------------------------
// A window closes on the timer while its input stays open
// ---------------------------------------------------------------------------

#[test]
fn a_window_closes_on_the_timer_while_its_input_stays_open_and_a_reading_for_it_afterwards_is_late() {
    let dir = TempDir::new().unwrap();
    // Tumbling 2 s windows, 1 s wait.
    let (mut agent, mut fifo, flows) = start_live(dir.path(), &fifo_window_flow(2, 1));
    let out = flows.join("out.jsonl");
    let late = flows.join("late.jsonl");

    // 20 and 22 fall into window 0 [T0, T0+2); 30 opens window 1 [T0+2, T0+4).
    // The watermark is then T0+2-1 = T0+1, so nothing but idle time can
    // close window 0 (after 1 s) or window 1 (after 3 s): no more readings
    // come, and the FIFO stays open, so there is no end of input either.
    let sent = Instant::now();
    let batch: String = [reading(T0, 20.0), reading(T0 + 1.0, 22.0), reading(T0 + 2.0, 30.0)]
        .iter()
        .map(line)
        .collect();
    fifo.send(&batch);

    let window_0 = json!(["a", [0, {"temp": {"count": 2, "mean": 21.0}}]]);
    let first = agent.wait_for(
        Duration::from_secs(5),
        "window 0 in out.jsonl, closed by the timer with the FIFO still open",
        || at_least(&out, 1),
    );
    let closed_after = sent.elapsed();
    assert_eq!(first, vec![window_0.clone()], "out.jsonl");
    assert!(
        closed_after >= Duration::from_millis(950),
        "window 0 closed {closed_after:?} after its readings were written, but the watermark (T0+1) \
         reaches its close time (T0+2) only after 1 s of idleness"
    );

    // Window 0 is closed; key "a" lives on with window 1 open, its watermark
    // now past T0+2. A reading for window 0 is late, and is not folded.
    let straggler = reading(T0 + 0.5, 99.0);
    fifo.send(&line(&straggler));
    let late_items = agent.wait_for(Duration::from_secs(5), "the straggler in late.jsonl", || {
        at_least(&late, 1)
    });
    assert_eq!(late_items, vec![json!(["a", [0, straggler]])], "late.jsonl");

    // Window 1 closes on the timer too, 3 s after the readings.
    let both = agent.wait_for(Duration::from_secs(5), "window 1 in out.jsonl", || at_least(&out, 2));
    assert_eq!(
        both,
        vec![window_0, json!(["a", [1, {"temp": {"count": 1, "mean": 30.0}}]])],
        "out.jsonl"
    );

    let log = stop_cleanly(&mut agent);
    // "stopped", not "finished": the input never ended.
    let summary = log
        .lines()
        .find(|l| l.contains("flow live stopped:"))
        .unwrap_or_else(|| panic!("no summary line `flow live stopped:` in the log:\n{log}"));
    assert!(
        summary.split_whitespace().any(|kv| kv == "stats.late=1"),
        "the summary counts one late reading: {summary}"
    );
    drop(fifo);
}

// ---------------------------------------------------------------------------
// Idle agents sleep
// ---------------------------------------------------------------------------

#[test]
fn an_agent_waiting_on_a_silent_input_with_a_window_open_uses_no_cpu() {
    let dir = TempDir::new().unwrap();
    // One reading from a plain file opens a window whose close is an hour
    // away (wait 1 h), so the engine has a deadline far in the future. The
    // FIFO input stays open and silent, so the flow never ends. The reading
    // comes from a file, not the FIFO, so that it reaches the engine however
    // the FIFO source batches; seen.jsonl shows that it did.
    let flow = r#"from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("idle")
seed = op.input("seed", flow, sources.file("seed.jsonl"))
live = op.input("in", flow, sources.file("in.fifo", decode="jsonl"))
readings = op.merge("both", seed, live)
op.output("seen", readings, sinks.file("seen.jsonl"))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(hours=1), unit="s")
windower = win.TumblingWindower(timedelta(seconds=2), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("stats", keyed, clock, windower, {"temp": ["count", "mean"]})
op.output("out", stats.down, sinks.file("out.jsonl"))
"#;
    let seed = reading(T0, 20.0);
    write_file(&dir.path().join("flows"), "seed.jsonl", &line(&seed));
    let (mut agent, fifo, flows) = start_live(dir.path(), flow);
    agent.wait_for(Duration::from_secs(10), "the seed reading in seen.jsonl", || {
        at_least(&flows.join("seen.jsonl"), 1)
    });

    assert_idles_without_cpu(&mut agent, "one window open, its close an hour away, input silent");

    assert_eq!(
        jsonl_items(&flows.join("out.jsonl")),
        Vec::<Value>::new(),
        "the window is still open"
    );
    stop_cleanly(&mut agent);
    drop(fifo);
}

#[test]
fn an_agent_with_no_flows_uses_no_cpu() {
    let dir = TempDir::new().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    let config = write_agent_config(dir.path(), &flows);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log(Duration::from_secs(10), "no flows are running");

    assert_idles_without_cpu(&mut agent, "no flows");

    stop_cleanly(&mut agent);
}

// ---------------------------------------------------------------------------
// The watermark of an idle key follows elapsed monotonic time
// ---------------------------------------------------------------------------

#[test]
fn while_a_key_is_idle_its_watermark_advances_by_the_elapsed_monotonic_time_not_the_wall_clock() {
    let dir = TempDir::new().unwrap();
    // Tumbling 4 s windows, 2 s wait; everything below is in window 0
    // [T0, T0+4). After the first reading the watermark is T0+1 plus the
    // time key "a" has been idle since.
    let (mut agent, mut fifo, flows) = start_live(dir.path(), &fifo_window_flow(4, 2));
    let out = flows.join("out.jsonl");
    let late = flows.join("late.jsonl");
    let sleep_until = |t: Instant| thread::sleep(t.saturating_duration_since(Instant::now()));

    let sent = Instant::now();
    fifo.send(&line(&reading(T0 + 3.0, 10.0)));

    // ~0.2 s idle: watermark ~T0+1.2. T0+2.5 is on time; it would be late
    // only after 1.5 s of idleness, or at once if the watermark followed the
    // wall clock (today is long after 2024). It does not move the watermark
    // (T0+2.5-2 is below it).
    sleep_until(sent + Duration::from_millis(200));
    fifo.send(&line(&reading(T0 + 2.5, 20.0)));

    // ~1.5 s idle: watermark ~T0+2.5. T0+1.5 is late; with a watermark
    // frozen at T0+1 while the key is idle it would be on time.
    sleep_until(sent + Duration::from_millis(1500));
    let straggler = reading(T0 + 1.5, 99.0);
    fifo.send(&line(&straggler));

    // The watermark reaches the close time T0+4 after 3 s of idleness since
    // the first reading, which is the last that moved it.
    let closed = agent.wait_for(Duration::from_secs(6), "window 0 in out.jsonl", || at_least(&out, 1));
    let closed_after = sent.elapsed();
    let late_items = jsonl_items(&late);
    assert_eq!(
        (closed, late_items),
        (
            vec![json!(["a", [0, {"temp": {"count": 2, "mean": 15.0}}]])],
            vec![json!(["a", [0, straggler]])]
        ),
        "(out.jsonl, late.jsonl): window 0 holds 10 and 20; 99 is late"
    );
    assert!(
        closed_after >= Duration::from_millis(2950),
        "window 0 closed {closed_after:?} after the first reading was written; the watermark \
         (T0+1 then) reaches the close time T0+4 only after 3 s of idleness"
    );

    stop_cleanly(&mut agent);
    drop(fifo);
}

// ---------------------------------------------------------------------------
// 100,000 keys: their windows close on time, and idle keys cost nothing
// ---------------------------------------------------------------------------

/// A key's window closes `WINDOW_END_S - 1 + WAIT` seconds after its one
/// reading arrives (the watermark of an idle key advances with the
/// monotonic clock); the results of all 100,000 must be out by then plus
/// this much.
const ON_TIME_SLACK: Duration = Duration::from_secs(3);

/// Most CPU the agent may use while one busy key sends a reading every
/// 5 ms for 4 s next to 100,000 idle keys with open windows (measured:
/// 0.13 s with the release build). Visiting the idle keys after each of
/// those ~800 batches (1 to 2 ms a visit) would cost about a second.
const HOT_KEY_CPU_BUDGET_S: f64 = 0.6;

#[test]
fn windows_of_100000_idle_keys_close_on_time_and_the_idle_keys_cost_nothing_per_batch() {
    const KEYS: usize = 100_000;
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    // 10 s windows, 1 s wait; every idle key reads once at 1 s into window 0,
    // so its watermark starts at 0 s and reaches the close (10 s) 10 s later.
    let (mut agent, mut fifo, flows) = start_live(
        dir,
        &fifo_window_flow(10, 1).replace(r#"{"temp": ["count", "mean"]}"#, r#"{"temp": ["count"]}"#),
    );
    let out = flows.join("out.jsonl");
    let sent_from = Instant::now();
    for chunk in 0..10 {
        let lines: String = (0..KEYS / 10)
            .map(|i| line(&json!({"sensor": format!("k{}", chunk * KEYS / 10 + i), "ts": T0 + 1.0, "temp": 1.0})))
            .collect();
        fifo.send(&lines);
    }
    let sent_by = Instant::now();

    // One busy key next to them (once they are read): a reading every 5 ms
    // for 4 s, in window 0 too (its windows close with its own data, later).
    thread::sleep(Duration::from_secs(1));
    let cpu_before = cpu_seconds(agent.pid());
    let hot_from = Instant::now();
    let mut t = T0 + 1.0;
    while hot_from.elapsed() < Duration::from_secs(4) {
        fifo.send(&line(&json!({"sensor": "hot", "ts": t, "temp": 2.0})));
        t += 0.001;
        thread::sleep(Duration::from_millis(5));
    }
    let hot_cpu = cpu_seconds(agent.pid()) - cpu_before;
    let hot_took = hot_from.elapsed();
    eprintln!("busy key next to {KEYS} idle keys: {hot_cpu:.2} s of CPU in {hot_took:.1?}");
    assert!(
        hot_cpu < HOT_KEY_CPU_BUDGET_S,
        "a busy key next to {KEYS} idle keys cost the agent {hot_cpu:.2} s of CPU in {hot_took:.1?} \
         (budget {HOT_KEY_CPU_BUDGET_S} s): are the idle keys scanned per batch?\n{}",
        agent.stderr()
    );

    // Not early: nothing has closed 8.5 s after the first reading.
    let early = sent_from + Duration::from_millis(8500);
    thread::sleep(early.saturating_duration_since(Instant::now()));
    let closed_early = jsonl_items(&out).len();
    assert_eq!(closed_early, 0, "windows closed before their time:\n{}", agent.stderr());

    // On time: all of them by 10 s after the last idle reading, plus slack.
    let due = sent_by + Duration::from_secs(10) + ON_TIME_SLACK;
    let items = agent.wait_for(
        due.saturating_duration_since(Instant::now()),
        "every idle key's window",
        || {
            let items = jsonl_items(&out);
            match items.len() {
                n if n >= KEYS => Ok(items),
                n => Err(format!(
                    "{n} of {KEYS} windows out, {:.1?} after the last idle reading",
                    sent_by.elapsed()
                )),
            }
        },
    );
    let idle: Vec<&Value> = items.iter().filter(|v| v[0] != "hot").collect();
    assert_eq!(idle.len(), KEYS, "one result per idle key");
    assert!(
        idle.iter().all(|v| v[1][0] == 0 && v[1][1]["temp"]["count"] == 1),
        "each idle key: window 0 with its one reading; first: {:?}",
        idle.first()
    );
    stop_cleanly(&mut agent);
}
