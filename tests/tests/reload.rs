//! The flows folder while `runnel run` runs: new, changed and removed flow
//! files, editors' saves, broken saves, SIGHUP, permissions, and an MQTT flow
//! reloaded while messages stream in. Real processes, real inotify, a real
//! mosquitto.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::mqtt::{publish_on, Broker};
use runnel_tests::{jsonl_items, runnel_command, toml_path, write_agent_config, write_file, Agent, Fifo};
use serde_json::{json, Value};
use tempfile::TempDir;

const STOP_WITHIN: Duration = Duration::from_secs(6);

/// A flow `id` reading `fifo`: a running count per key (`stateful_map`,
/// step "count"), then a map that tags each item with `version` (the part
/// a reload changes), to `<id>.jsonl`.
fn counting_flow(id: &str, fifo: &str, version: u32) -> String {
    format!(
        r#"from runnel import Dataflow, op, sources, sinks

def count(n, x):
    n = (n or 0) + 1
    return n, {{"n": n, "x": x["x"]}}

flow = Dataflow({id:?})
items = op.input("in", flow, sources.file({fifo:?}))
keyed = op.key_on("key", items, "k")
counted = op.stateful_map("count", keyed, count)
tagged = op.map("tag", counted, lambda kv: {{"k": kv[0], **kv[1], "version": {version}}})
op.output("out", tagged, sinks.file("{id}.jsonl"))
"#
    )
}

/// Wait until `path` has `n` items; returns them.
fn items(agent: &mut Agent, path: &Path, n: usize) -> Vec<Value> {
    agent.wait_for(
        Duration::from_secs(15),
        &format!("{n} items in {}", path.display()),
        || {
            let got = jsonl_items(path);
            if got.len() >= n {
                Ok(got)
            } else {
                Err(format!("{} of {n}: {got:?}", got.len()))
            }
        },
    )
}

/// Write `text` to `path` the way vim and many editors save: a temporary
/// file in the same folder, then a rename over the old one.
fn editor_save(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(".{}.swp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The agent's log so far (`Agent::start` writes it to stderr.txt).
fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn changed_flows_swap_in_with_their_state_broken_ones_leave_the_old_running_and_others_go_on() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let a_path = write_file(&flows, "a.py", &counting_flow("a", "a.fifo", 1));
    write_file(&flows, "b.py", &counting_flow("b", "b.fifo", 1));
    let mut a_in = Fifo::create(&flows.join("a.fifo"));
    let mut b_in = Fifo::create(&flows.join("b.fifo"));
    let config = write_agent_config(dir, &flows);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), "starting flow \"b\"");
    let (a_out, b_out) = (flows.join("a.jsonl"), flows.join("b.jsonl"));
    let send = |fifo: &mut Fifo, x: i64| fifo.send_json(&[json!({"k": "key1", "x": x})]);
    send(&mut a_in, 1);
    send(&mut a_in, 2);
    items(&mut agent, &a_out, 2);

    // An editor's save (temp file + rename): exactly one reload.
    editor_save(&a_path, &counting_flow("a", "a.fifo", 2));
    agent.wait_for_log(Duration::from_secs(10), "reloaded: starting flow \"a\"");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        count(&agent.stderr(), "reloaded: starting flow \"a\""),
        1,
        "{}",
        agent.stderr()
    );
    send(&mut a_in, 3);
    send(&mut b_in, 100);
    let got = items(&mut agent, &a_out, 3);
    // The count went on from 2: the unchanged step kept its state.
    assert_eq!(got[2], json!({"k": "key1", "n": 3, "x": 3, "version": 2}), "{got:?}");

    // A broken save: logged with file and line, the running version goes on.
    std::fs::write(
        &a_path,
        format!("{}\nthis is not python(\n", counting_flow("a", "a.fifo", 3)),
    )
    .unwrap();
    agent.wait_for_log(Duration::from_secs(10), "not reloaded (the running version goes on)");
    let log = agent.stderr();
    let bad_line = counting_flow("a", "a.fifo", 3).lines().count() + 2;
    assert!(
        log.contains(&format!("{}:{bad_line}", a_path.display())),
        "file:line of the error:\n{log}"
    );
    send(&mut a_in, 4);
    let got = items(&mut agent, &a_out, 4);
    assert_eq!(got[3], json!({"k": "key1", "n": 4, "x": 4, "version": 2}), "{got:?}");

    // Fixed in place, and SIGHUP asked for on top: one more reload.
    std::fs::write(&a_path, counting_flow("a", "a.fifo", 4)).unwrap();
    agent.wait_for(Duration::from_secs(10), "the second reload", || {
        match count(&agent_log(dir), "reloaded: starting flow \"a\"") {
            2.. => Ok(()),
            n => Err(format!("{n} reloads")),
        }
    });
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    agent.wait_for_log(Duration::from_secs(10), "SIGHUP: rescanning");
    thread::sleep(Duration::from_millis(800));
    assert_eq!(
        count(&agent.stderr(), "reloaded: starting flow \"a\""),
        2,
        "{}",
        agent.stderr()
    );
    send(&mut a_in, 5);
    let got = items(&mut agent, &a_out, 5);
    assert_eq!(got[4], json!({"k": "key1", "n": 5, "x": 5, "version": 4}), "{got:?}");

    // Removed: its flow stops; the other flow ran through all of it.
    std::fs::remove_file(&a_path).unwrap();
    agent.wait_for_log(Duration::from_secs(10), "a.py was removed; stopping the flow");
    send(&mut b_in, 101);
    let got = items(&mut agent, &b_out, 2);
    assert_eq!(got[1], json!({"k": "key1", "n": 2, "x": 101, "version": 1}), "{got:?}");
    assert!(!agent.stderr().contains("flow b stopped"), "b was never disturbed");
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
}

#[test]
fn flow_files_others_may_change_are_refused_by_run_and_check_until_fixed() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let path = write_file(&flows, "open.py", &counting_flow("open", "open.fifo", 1));
    let mut input = Fifo::create(&flows.join("open.fifo"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let check = runnel_command(dir).arg("check").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is writable by group and others") && err.contains("chmod go-w"),
        "{err}"
    );
    let config = write_agent_config(dir, &flows);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), "flow file refused");
    assert!(
        agent.stderr().contains(&format!("chmod go-w {}", path.display())),
        "{}",
        agent.stderr()
    );
    // chmod fixes it: picked up without a restart.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    agent.wait_for_log(Duration::from_secs(10), "starting flow \"open\"");
    input.send_json(&[json!({"k": "a", "x": 1})]);
    items(&mut agent, &flows.join("open.jsonl"), 1);
    // A flows folder others may write is refused as a whole.
    std::fs::set_permissions(&flows, std::fs::Permissions::from_mode(0o777)).unwrap();
    write_file(&flows, "late.py", &counting_flow("late", "late.fifo", 1));
    agent.wait_for_log(Duration::from_secs(10), "flows folder refused");
    assert!(!agent.stderr().contains("starting flow \"late\""), "{}", agent.stderr());
    std::fs::set_permissions(&flows, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
}

#[test]
fn an_mqtt_flow_reloaded_while_messages_stream_in_loses_none_and_a_new_file_subscribes_live() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let broker = Broker::start(&dir.join("broker"), "");
    let flows = dir.join("flows");
    let mqtt_flow = |id: &str, topic: &str, version: u32| {
        format!(
            "from runnel import Dataflow, op, sources, sinks\nflow = Dataflow({id:?})\nx = op.input(\"in\", flow, sources.mqtt({topic:?}, qos=1))\nop.output(\"out\", op.map(\"tag\", x, lambda m: {{**m, \"version\": {version}}}), sinks.file(\"{id}.jsonl\"))\n"
        )
    };
    let m_path = write_file(&flows, "m.py", &mqtt_flow("m", "r/+", 1));
    let config = write_file(
        dir,
        "runnel.toml",
        &format!(
            "device_id = \"reload\"\nflows_dir = {}\nstate_dir = {}\nstatus_interval = 0\n[brokers.default]\nhost = \"127.0.0.1\"\nport = {}\n",
            toml_path(&flows),
            toml_path(&dir.join("state")),
            broker.port
        ),
    );
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), "connected to broker default");
    let port = broker.port;
    let n = 300;
    let feed = thread::spawn(move || {
        for i in 0..n {
            publish_on(port, "r/dev1", format!("{{\"seq\": {i}}}").as_bytes(), 1, &[]);
            thread::sleep(Duration::from_millis(20));
        }
    });
    // Reload twice while the feed runs.
    let out = flows.join("m.jsonl");
    agent.wait_for(Duration::from_secs(20), "the feed to be under way", || {
        if jsonl_items(&out).len() >= 30 {
            Ok(())
        } else {
            Err("fewer than 30".into())
        }
    });
    editor_save(&m_path, &mqtt_flow("m", "r/+", 2));
    agent.wait_for_log(Duration::from_secs(10), "reloaded: starting flow \"m\"");
    thread::sleep(Duration::from_millis(300));
    editor_save(&m_path, &mqtt_flow("m", "r/+", 3));
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&agent.stderr(), "reloaded: starting flow \"m\"") < 2 {
        assert!(Instant::now() < deadline, "{}", agent.stderr());
        thread::sleep(Duration::from_millis(20));
    }
    feed.join().unwrap();
    let got = items(&mut agent, &out, n);
    let mut seqs: Vec<i64> = got.iter().map(|v| v["seq"].as_i64().unwrap()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, (0..n as i64).collect::<Vec<_>>(), "every message once or more");
    let versions: std::collections::BTreeSet<i64> = got.iter().map(|v| v["version"].as_i64().unwrap()).collect();
    assert_eq!(
        versions,
        [1, 2, 3].into_iter().collect(),
        "all three versions ran\n{}",
        agent.stderr()
    );
    // A new flow file with a topic nobody subscribed to yet.
    write_file(&flows, "s.py", &mqtt_flow("s", "s/+", 1));
    agent.wait_for_log(Duration::from_secs(10), "starting flow \"s\"");
    thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        publish_on(broker.port, "s/dev2", format!("{{\"seq\": {i}}}").as_bytes(), 1, &[]);
    }
    items(&mut agent, &flows.join("s.jsonl"), 5);
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
}

#[test]
fn sighup_retries_a_file_refused_for_a_reason_outside_it() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    // Two files define the same flow id: the second is refused.
    let first = write_file(&flows, "dup1.py", &counting_flow("dup", "one.fifo", 1));
    write_file(&flows, "dup2.py", &counting_flow("dup", "two.fifo", 2));
    let _one = Fifo::create(&flows.join("one.fifo"));
    let mut two = Fifo::create(&flows.join("two.fifo"));
    let config = write_agent_config(dir, &flows);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), "already runs a flow with that id");
    // The id is free once dup1.py goes, but dup2.py did not change: only
    // SIGHUP tries it again.
    std::fs::remove_file(&first).unwrap();
    agent.wait_for_log(Duration::from_secs(10), "dup1.py was removed");
    thread::sleep(Duration::from_millis(800));
    assert_eq!(count(&agent.stderr(), "flow \"dup\" from"), 1, "{}", agent.stderr());
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    agent.wait_for_log(Duration::from_secs(10), "dup2.py");
    agent.wait_for(Duration::from_secs(10), "dup2.py to start", || {
        match count(&agent_log(dir), "flow \"dup\" from") {
            2.. => Ok(()),
            n => Err(format!("{n} starts")),
        }
    });
    two.send_json(&[json!({"k": "a", "x": 7})]);
    let got = items(&mut agent, &flows.join("dup.jsonl"), 1);
    assert_eq!(got[0]["version"], json!(2), "{got:?}");
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
}
