//! MQTT in and out under `runnel run`, against real mosquitto brokers on
//! loopback ports: readings published to an ingest broker go through
//! windows and arrive as summaries on an upstream broker, where a
//! `mosquitto_sub` receives them. Brokers are killed and restarted, and the
//! agent is `kill -9`ed, to show that the outbox loses nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::mqtt::{Broker, Message, Receiver};
use runnel_tests::{toml_path, write_file, Agent};
use serde_json::{json, Value};
use tempfile::TempDir;

/// 2024-01-01T00:00:00Z: the windows are aligned to it.
const T0: i64 = 1_704_067_200;
const STOP_WITHIN: Duration = Duration::from_secs(5);
const ARRIVE_WITHIN: Duration = Duration::from_secs(20);

/// The flow of most tests: MQTT readings keyed by the topic's device
/// level, 10 s tumbling windows on the payload's `ts`, summaries upstream.
fn aggregate_flow(decode: &str, encode: &str) -> String {
    format!(
        r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("temps")
readings = op.input("in", flow, sources.mqtt("sensors/{{device}}/temp", decode="{decode}"))
keyed = op.key_on("by_device", readings, "device")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=0), unit="s")
tens = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per10s", keyed, clock, tens, {{"temp": ["count", "mean", "max"]}})
op.output("up", stats.down, sinks.mqtt("up/{{device_id}}/{{flow}}/{{key}}", encode="{encode}"))
"#
    )
}

/// A test's folder, brokers and agent config.
struct Setup {
    dir: TempDir,
    ingest: Broker,
    upstream: Broker,
    config: PathBuf,
}

/// Extra lines for the parts of the agent's config.
#[derive(Default)]
struct Keys<'a> {
    top: &'a str,
    default: &'a str,
    upstream: &'a str,
}

impl Setup {
    fn new(flow: &str, upstream_extra: &str, broker_keys: &str) -> Setup {
        Self::with(
            flow,
            "",
            upstream_extra,
            Keys {
                upstream: broker_keys,
                ..Keys::default()
            },
        )
    }

    fn with(flow: &str, ingest_extra: &str, upstream_extra: &str, keys: Keys) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let ingest = Broker::start(&dir.path().join("ingest"), ingest_extra);
        let upstream = Broker::start(&dir.path().join("upstream"), upstream_extra);
        write_file(dir.path(), "flows/flow.py", flow);
        let config = write_file(
            dir.path(),
            "runnel.toml",
            &format!(
                "device_id = \"test-device\"\nflows_dir = {}\nstate_dir = {}\n{}\n\n\
                 [brokers.default]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_max = 2\n{}\n\n\
                 [brokers.upstream]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_max = 2\n{}\n",
                toml_path(&dir.path().join("flows")),
                toml_path(&dir.path().join("state")),
                if keys.top.is_empty() {
                    "status_interval = 0"
                } else {
                    keys.top
                },
                ingest.port,
                keys.default,
                upstream.port,
                keys.upstream,
            ),
        );
        Setup {
            dir,
            ingest,
            upstream,
            config,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn start_agent(&self, log: &str) -> Agent {
        let mut agent = Agent::start_logging_to(self.path(), &self.config, log);
        agent.wait_for_log(Duration::from_secs(20), "connected to broker default");
        agent
    }

    /// Where receivers keep what they received.
    fn receivers_dir(&self) -> PathBuf {
        let dir = self.path().join("receivers");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The agent's stats messages, as the ingest broker sees them.
    fn stats_receiver(&self) -> Receiver {
        Receiver::start(
            self.ingest.port,
            "runnel/test-device/stats",
            &self.receivers_dir(),
            None,
        )
    }

    /// Summaries, as the upstream broker delivers them.
    fn receiver(&self, session: Option<&str>) -> Receiver {
        Receiver::start(self.upstream.port, "up/#", &self.receivers_dir(), session)
    }
}

/// A reading as JSON or CBOR bytes.
fn reading(ts: i64, temp: f64, cbor: bool) -> Vec<u8> {
    let v = json!({"ts": ts, "temp": temp});
    if cbor {
        serde_cbor::to_vec(&v).unwrap()
    } else {
        serde_json::to_vec(&v).unwrap()
    }
}

/// What the summaries must say, computed here from what is published:
/// (device, window) → temperatures.
type Expected = BTreeMap<(String, i64), Vec<f64>>;

fn publish_readings(b: &Broker, readings: &[(&str, i64, f64)], cbor: bool, expected: &mut Expected) {
    for (device, offset, temp) in readings {
        b.publish(&format!("sensors/{device}/temp"), &reading(T0 + offset, *temp, cbor), 1);
        expected
            .entry((device.to_string(), offset.div_euclid(10)))
            .or_default()
            .push(*temp);
    }
}

/// The payload of a summary, JSON or CBOR, as JSON.
fn decode(m: &Message, cbor: bool) -> Value {
    if cbor {
        serde_cbor::from_slice(&m.payload).unwrap_or_else(|e| panic!("not CBOR ({e}): {:?}", m.payload))
    } else {
        m.json()
    }
}

/// Every summary must be exactly what `expected` says, field by field,
/// once (a duplicate only with the same id and seq). A device's windows
/// after its last expected one were still open at the end of the readings
/// and may close by elapsed time (live mode) while a test waits: those are
/// not checked.
fn check_summaries(got: &[Message], cbor: bool, expected: &Expected) {
    let mut seen: BTreeMap<(String, i64), Value> = BTreeMap::new();
    let mut last_seq = 0;
    let last_expected = |device: &str| expected.keys().filter(|(d, _)| d == device).map(|(_, w)| *w).max();
    for m in got {
        let v = decode(m, cbor);
        let device = v["key"].as_str().expect("key").to_string();
        let window = v["window"].as_i64().expect("window");
        if last_expected(&device).is_some_and(|w| window > w) {
            continue;
        }
        assert_eq!(m.topic, format!("up/test-device/temps/{device}"), "{v}");
        assert_eq!(v["id"], json!(format!("test-device/temps/up/{device}/{window}")), "{v}");
        assert_eq!(v["device_id"], json!("test-device"));
        assert_eq!(v["flow"], json!("temps"));
        assert_eq!(v["step"], json!("up"));
        let seq = v["seq"].as_i64().expect("seq");
        if let Some(before) = seen.get(&(device.clone(), window)) {
            assert_eq!(before, &v, "a duplicate must be the same message");
            continue;
        }
        assert!(
            seq > last_seq,
            "seq goes up in the order messages arrive: {seq} after {last_seq}"
        );
        last_seq = seq;
        seen.insert((device, window), v);
    }
    let keys: Vec<_> = seen.keys().cloned().collect();
    let want: Vec<_> = expected.keys().cloned().collect();
    assert_eq!(keys, want, "one summary per (device, window)");
    for (k, temps) in expected {
        let stats = &seen[k]["value"]["temp"];
        let mean = temps.iter().sum::<f64>() / temps.len() as f64;
        let max = temps.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(stats["count"], json!(temps.len()), "{k:?}: {stats}");
        assert!(
            (stats["mean"].as_f64().unwrap() - mean).abs() < 1e-9,
            "{k:?}: {stats} vs mean {mean}"
        );
        assert_eq!(stats["max"].as_f64(), Some(max), "{k:?}: {stats}");
    }
}

/// Closing readings (one per device, far ahead) that close every earlier window.
fn close_windows(b: &Broker, devices: &[&str], at: i64, cbor: bool) {
    for d in devices {
        b.publish(&format!("sensors/{d}/temp"), &reading(T0 + at, 0.0, cbor), 1);
    }
}

fn wait_for_summaries(r: &Receiver, n: usize) -> Vec<Message> {
    r.wait_until(ARRIVE_WITHIN, &format!("{n} summaries"), |m| {
        let mut ids: Vec<String> = m.iter().map(|m| m.topic.clone() + &m.text()).collect();
        ids.sort();
        ids.dedup();
        m.len() >= n
    })
}

fn end_to_end(decode_as: &str, encode_as: &str, protocol: &str) {
    let cbor_in = decode_as == "cbor";
    let cbor_out = encode_as == "cbor";
    let keys = format!("protocol = \"{protocol}\"");
    let s = Setup::with(
        &aggregate_flow(decode_as, encode_as),
        "",
        "",
        Keys {
            default: &keys,
            upstream: &keys,
            ..Keys::default()
        },
    );
    let r = s.receiver(None);
    let mut agent = s.start_agent("agent.log");
    let mut expected = Expected::new();
    publish_readings(
        &s.ingest,
        &[
            ("d1", 1, 20.5),
            ("d2", 2, 30.0),
            ("d1", 4, 21.5),
            ("d1", 9, 19.0),
            ("d2", 12, 31.0),
            ("d1", 15, 22.25),
            ("d2", 18, 29.5),
        ],
        cbor_in,
        &mut expected,
    );
    close_windows(&s.ingest, &["d1", "d2"], 100, cbor_in);
    let got = wait_for_summaries(&r, expected.len());
    check_summaries(&got, cbor_out, &expected);
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());
}

#[test]
fn readings_in_json_arrive_upstream_as_json_summaries_keyed_by_the_topic() {
    end_to_end("json", "json", "3.1.1");
}

#[test]
fn the_same_over_mqtt_5() {
    end_to_end("json", "json", "5");
}

#[test]
fn readings_in_cbor_arrive_upstream_as_cbor_summaries() {
    end_to_end("cbor", "cbor", "3.1.1");
}

#[test]
fn malformed_payloads_are_counted_and_skipped_and_good_ones_around_them_count() {
    let flow = r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("temps")
js = op.input("in", flow, sources.mqtt("sensors/{device}/temp"))
cb = op.input("cbor_in", flow, sources.mqtt("cbor/{device}/temp", decode="cbor"))
keyed = op.key_on("by_device", op.merge("both", js, cb), "device")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=0), unit="s")
tens = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per10s", keyed, clock, tens, {"temp": ["count", "mean", "max"]})
op.output("up", stats.down, sinks.mqtt("up/{device_id}/{flow}/{key}"))
"#;
    let s = Setup::new(flow, "", "");
    let r = s.receiver(None);
    let mut agent = s.start_agent("agent.log");
    let mut expected = Expected::new();
    publish_readings(&s.ingest, &[("d1", 1, 20.0)], false, &mut expected);
    let big = format!(
        "{{\"ts\": {}, \"temp\": 1.0, \"pad\": \"{}\"}}",
        T0 + 2,
        "x".repeat(1 << 20)
    );
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("sensors/d1/temp", b"{\"ts\": 17042".to_vec()),
        ("sensors/d1/temp", big.into_bytes()),
        ("sensors/d1/temp", b"\xff\xfe{\"ts\": 1}".to_vec()),
        ("sensors/d1/temp", Vec::new()),
        ("cbor/d1/temp", b"\xff\x00\x13garbage".to_vec()),
    ];
    for (topic, payload) in &bad {
        s.ingest.publish(topic, payload, 1);
    }
    // Wrong types: a text temperature is left out of the statistics, and a
    // text timestamp makes the reading unusable for the clock.
    s.ingest.publish(
        "sensors/d1/temp",
        format!("{{\"ts\": {}, \"temp\": \"warm\"}}", T0 + 3).as_bytes(),
        1,
    );
    s.ingest
        .publish("sensors/d1/temp", b"{\"ts\": \"yesterday\", \"temp\": 5.0}", 1);
    s.ingest.publish("cbor/d1/temp", &reading(T0 + 5, 22.0, true), 1);
    publish_readings(&s.ingest, &[("d1", 6, 24.0)], false, &mut expected);
    expected.get_mut(&("d1".to_string(), 0)).unwrap().insert(1, 22.0);
    close_windows(&s.ingest, &["d1"], 100, false);
    let got = wait_for_summaries(&r, 1);
    let v = got[0].json();
    assert_eq!(v["value"]["temp"]["count"], json!(3), "{v}");
    assert_eq!(v["value"]["temp"]["mean"], json!(22.0), "{v}");
    agent.assert_running();
    let log = agent.stderr();
    for needle in [
        "message on sensors/d1/temp: not JSON",
        "is over max_payload (262144)",
        "message on sensors/d1/temp: not UTF-8",
        "message on sensors/d1/temp: empty payload",
        "message on cbor/d1/temp: not CBOR",
    ] {
        assert!(log.contains(needle), "no log line with {needle:?}:\n{log}");
    }
    assert!(agent.terminate(STOP_WITHIN).success());
    let log = agent.stderr();
    assert!(log.contains("in.malformed=4"), "{log}");
    assert!(log.contains("cbor_in.malformed=1"), "{log}");
    assert!(log.contains("per10s.skipped.bad_timestamp=1"), "{log}");
}

/// Wait until a stats message says `check` about broker `upstream`'s figures.
fn wait_for_stats(r: &Receiver, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let got = r.wait_until(ARRIVE_WITHIN, what, |m| {
        m.iter().any(|m| check(&m.json()["brokers"]["upstream"]))
    });
    got.iter()
        .map(|m| m.json())
        .find(|v| check(&v["brokers"]["upstream"]))
        .expect("found above")
}

/// One reading per device and window: windows `from..to` get values
/// 10·w + i (i the device's index), then every window below `to` closes.
fn one_per_window(b: &Broker, devices: &[&str], from: i64, to: i64, expected: &mut Expected) {
    for w in from..to {
        let rs: Vec<(&str, i64, f64)> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (*d, w * 10 + 1, (w * 10 + i as i64) as f64))
            .collect();
        publish_readings(b, &rs, false, expected);
    }
}

#[test]
fn summaries_made_while_the_upstream_broker_is_down_arrive_in_order_after_it_returns() {
    let mut s = Setup::new(
        &aggregate_flow("json", "json"),
        "persistence true\nautosave_interval 1\n",
        "",
    );
    let mut r1 = s.receiver(Some("fleet-receiver"));
    // Let the broker save the receiver's persistent session before it is killed.
    thread::sleep(Duration::from_millis(2500));
    let mut agent = s.start_agent("agent.log");
    agent.wait_for_log(ARRIVE_WITHIN, "connected to broker upstream");
    let mut expected = Expected::new();
    one_per_window(&s.ingest, &["d1"], 0, 3, &mut expected);
    r1.wait_until(ARRIVE_WITHIN, "2 summaries before the outage", |m| m.len() >= 2);

    s.upstream.kill();
    r1.stop();
    // 30 s without the upstream broker; a window closes every 3 s meanwhile.
    let outage = Instant::now();
    let mut w = 3;
    while outage.elapsed() < Duration::from_secs(30) {
        one_per_window(&s.ingest, &["d1"], w, w + 1, &mut expected);
        w += 1;
        thread::sleep(Duration::from_secs(3));
    }
    agent.assert_running();
    s.upstream.restart();
    let r2 = s.receiver(Some("fleet-receiver"));
    // The newest window stays open; every earlier one must arrive.
    expected.remove(&("d1".to_string(), w - 1));
    let n = expected.len();
    let got = r2.wait_until(Duration::from_secs(40), "every summary", |m| {
        let mut all: Vec<Message> = r1.messages();
        all.extend_from_slice(m);
        let mut ids: Vec<String> = all.iter().map(|m| m.json()["id"].to_string()).collect();
        ids.sort();
        ids.dedup();
        ids.len() >= n
    });
    let mut all = r1.messages();
    all.extend(got);
    check_summaries(&all, false, &expected);
    let log = agent.stderr();
    assert_eq!(
        log.matches("lost the connection to broker upstream").count(),
        1,
        "{log}"
    );
    assert!(
        log.matches("cannot connect to broker upstream").count() <= 1,
        "one line for the outage, not one per retry:\n{log}"
    );
    assert!(agent.terminate(STOP_WITHIN).success());
}

#[test]
fn a_persistent_session_keeps_what_was_published_while_runnel_was_down_and_survives_a_broker_restart() {
    let mut s = Setup::with(
        &aggregate_flow("json", "json"),
        "persistence true\n",
        "",
        Keys {
            default: "persistent_session = true",
            ..Keys::default()
        },
    );
    let r = s.receiver(None);
    let mut agent = s.start_agent("agent-1.log");
    let mut expected = Expected::new();
    one_per_window(&s.ingest, &["d1", "d2"], 0, 2, &mut expected);
    // The ingest broker restarts (saving the session): runnel reconnects and resubscribes.
    s.ingest.stop();
    s.ingest.restart();
    agent.wait_for(ARRIVE_WITHIN, "a second connect", || {
        let log = agent_log(s.dir.path(), "agent-1.log");
        (log.matches("connected to broker default").count() >= 2)
            .then_some(())
            .ok_or(log)
    });
    one_per_window(&s.ingest, &["d1", "d2"], 2, 4, &mut expected);
    // Window 3 is still open when the agent stops: its state is saved at
    // SIGTERM, so its readings count in the summary made after the restart.
    r.wait_until(ARRIVE_WITHIN, "windows 0-2", |m| m.len() >= 6);
    assert!(agent.terminate(STOP_WITHIN).success());
    // Published while runnel is down: the broker queues them for its session.
    one_per_window(&s.ingest, &["d1", "d2"], 6, 9, &mut expected);
    close_windows(&s.ingest, &["d1", "d2"], 100, false);
    let mut agent = Agent::start_logging_to(s.dir.path(), &s.config, "agent-2.log");
    let got = wait_for_summaries(&r, expected.len());
    check_summaries(&got, false, &expected);
    assert!(agent.terminate(STOP_WITHIN).success());
}

fn agent_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

#[test]
fn summaries_in_the_outbox_survive_kill_9_and_are_delivered_after_the_restart() {
    let mut s = Setup::with(
        &aggregate_flow("json", "json"),
        "",
        "",
        Keys {
            top: "status_interval = 1",
            ..Keys::default()
        },
    );
    s.upstream.kill();
    let stats = s.stats_receiver();
    let mut agent = Agent::start_logging_to(s.dir.path(), &s.config, "agent-1.log");
    agent.wait_for_log(ARRIVE_WITHIN, "connected to broker default");
    let mut expected = Expected::new();
    one_per_window(&s.ingest, &["d1", "d2"], 0, 2, &mut expected);
    close_windows(&s.ingest, &["d1", "d2"], 100, false);
    wait_for_stats(&stats, "4 entries in the outbox", |b| b["outbox_entries"] == json!(4));
    agent.kill9();

    s.upstream.restart();
    let r = s.receiver(None);
    let mut agent = Agent::start_logging_to(s.dir.path(), &s.config, "agent-2.log");
    let got = wait_for_summaries(&r, 4);
    check_summaries(&got, false, &expected);
    agent.wait_for_log(ARRIVE_WITHIN, "outbox of broker upstream: 4 undelivered message(s)");
    assert!(agent.terminate(STOP_WITHIN).success());
}

#[test]
fn a_full_outbox_drops_the_oldest_with_drop_oldest_and_keeps_everything_with_block() {
    for policy in ["drop-oldest", "block"] {
        let upstream_keys = format!("max_outbox_bytes = 1200\noutbox_full = \"{policy}\"");
        let mut s = Setup::with(
            &aggregate_flow("json", "json"),
            "",
            "persistence true\n",
            Keys {
                top: "status_interval = 1",
                upstream: &upstream_keys,
                ..Keys::default()
            },
        );
        // The receiver's persistent session outlives the upstream broker's
        // downtime, so nothing runnel sends before it reconnects is missed.
        let mut r = s.receiver(Some("fleet"));
        r.stop();
        s.upstream.stop();
        let stats = s.stats_receiver();
        let mut agent = Agent::start_logging_to(s.dir.path(), &s.config, "agent.log");
        agent.wait_for_log(ARRIVE_WITHIN, "connected to broker default");
        let mut expected = Expected::new();
        one_per_window(&s.ingest, &["d1"], 0, 10, &mut expected);
        close_windows(&s.ingest, &["d1"], 200, false);
        if policy == "drop-oldest" {
            let v = wait_for_stats(&stats, "dropped entries", |b| {
                b["outbox_dropped"].as_u64().unwrap_or(0) > 0
                    && b["outbox_dropped"].as_u64().unwrap() + b["outbox_entries"].as_u64().unwrap() >= 10
            });
            assert!(
                v["brokers"]["upstream"]["outbox_bytes"].as_u64().unwrap() <= 1200,
                "{v}"
            );
        } else {
            // The flow waits for room: the outbox takes one checkpoint's
            // messages past its bound (they commit with the state that made
            // them, all or none) and then nothing more while it is full.
            let v = wait_for_stats(&stats, "a full outbox", |b| {
                b["outbox_entries"].as_u64().unwrap_or(0) >= 2
            });
            let full = v["brokers"]["upstream"]["outbox_bytes"].as_u64().unwrap();
            assert!(full > 1200, "{v}");
            close_windows(&s.ingest, &["d1"], 300, false);
            thread::sleep(Duration::from_secs(2));
            let all = stats.wait_until(ARRIVE_WITHIN, "stats", |m| !m.is_empty());
            let later = all.last().expect("a stats message").json();
            assert_eq!(
                later["brokers"]["upstream"]["outbox_bytes"].as_u64().unwrap(),
                full,
                "a full outbox took more: {later}"
            );
        }
        s.upstream.restart();
        let r = s.receiver(Some("fleet"));
        if policy == "block" {
            // Nothing lost: every window, in order.
            let got = wait_for_summaries(&r, expected.len());
            check_summaries(&got, false, &expected);
        } else {
            // What arrives is the newest windows, each right; the rest were
            // dropped, counted and logged.
            agent.wait_for_log(ARRIVE_WITHIN, "outbox of broker upstream is full");
            let got = r.wait_until(ARRIVE_WITHIN, "the newest summaries", |m| {
                m.iter().any(|m| m.json()["window"] == json!(9))
            });
            let windows: Vec<i64> = got
                .iter()
                .map(|m| m.json()["window"].as_i64().unwrap())
                .filter(|w| *w < 10)
                .collect();
            let first = windows[0];
            assert!(first > 0, "the oldest were dropped: {windows:?}");
            assert_eq!(
                windows,
                (first..10).collect::<Vec<_>>(),
                "a contiguous run of the newest"
            );
            expected.retain(|(_, w), _| *w >= first);
            check_summaries(&got, false, &expected);
        }
        assert!(agent.terminate(STOP_WITHIN).success(), "{policy}: {}", agent.stderr());
    }
}

#[test]
fn the_status_topic_says_online_and_offline_and_stats_count_what_came_in() {
    let s = Setup::with(
        &aggregate_flow("json", "json"),
        "",
        "",
        Keys {
            top: "status_interval = 1",
            ..Keys::default()
        },
    );
    let dir = s.receivers_dir();
    let status = Receiver::start(s.ingest.port, "runnel/test-device/status", &dir, None);
    let stats = s.stats_receiver();
    let mut agent = s.start_agent("agent-1.log");
    status.wait_until(ARRIVE_WITHIN, "online", |m| m.iter().any(|m| m.text() == "online"));
    let mut expected = Expected::new();
    publish_readings(
        &s.ingest,
        &[("d1", 1, 20.0), ("d2", 2, 21.0), ("d1", 3, 22.0)],
        false,
        &mut expected,
    );
    s.ingest.publish("sensors/d1/temp", b"not json", 1);
    let got = stats.wait_until(ARRIVE_WITHIN, "stats with 3 readings in", |m| {
        m.iter().any(|m| m.json()["flows"]["temps"]["in"] == json!(3))
    });
    let v = got
        .iter()
        .map(|m| m.json())
        .find(|v| v["flows"]["temps"]["in"] == json!(3))
        .unwrap();
    assert_eq!(v["device_id"], json!("test-device"), "{v}");
    assert_eq!(v["flows_loaded"], json!(1), "{v}");
    let v = stats
        .wait_until(ARRIVE_WITHIN, "a decode error counted", |m| {
            m.iter()
                .any(|m| m.json()["flows"]["temps"]["decode_errors"] == json!(1))
        })
        .last()
        .unwrap()
        .json();
    assert_eq!(v["brokers"]["default"]["connected"], json!(true), "{v}");
    assert_eq!(v["brokers"]["default"]["received"], json!(4), "{v}");
    assert_eq!(v["brokers"]["upstream"]["connected"], json!(true), "{v}");

    // kill -9: the broker publishes the last will.
    agent.kill9();
    status.wait_until(ARRIVE_WITHIN, "offline from the will", |m| {
        m.last().is_some_and(|m| m.text() == "offline")
    });
    // Restarted, then stopped cleanly: online again, then offline, retained.
    let mut agent = s.start_agent("agent-2.log");
    status.wait_until(ARRIVE_WITHIN, "online again", |m| {
        m.last().is_some_and(|m| m.text() == "online")
    });
    assert!(agent.terminate(STOP_WITHIN).success());
    status.wait_until(ARRIVE_WITHIN, "offline on stop", |m| {
        m.last().is_some_and(|m| m.text() == "offline")
    });
    let late = Receiver::start(s.ingest.port, "runnel/test-device/status", &dir, None);
    late.wait_until(ARRIVE_WITHIN, "the retained status", |m| {
        m.len() == 1 && m[0].text() == "offline"
    });
}

/// `ack="after-commit"`: a message is acknowledged only once the state it
/// changed is committed. Killed with `kill -9` again and again while
/// readings flow, runnel still counts every reading exactly once: the
/// summaries a receiver sees upstream say so, window by window (a
/// duplicate only as a resend of the same message, same id and seq).
#[test]
fn with_after_commit_acks_kill_9_while_readings_flow_loses_and_doubles_nothing() {
    // Two readings per device share each second: with no wait, the second
    // would be late (live, the watermark moves on with the clock).
    let flow = aggregate_flow("json", "json")
        .replace(
            r#"sources.mqtt("sensors/{device}/temp", decode="json")"#,
            r#"sources.mqtt("sensors/{device}/temp", decode="json", ack="after-commit")"#,
        )
        .replace(
            "wait_for_system_duration=timedelta(seconds=0)",
            "wait_for_system_duration=timedelta(seconds=5)",
        );
    assert!(flow.contains("after-commit") && flow.contains("seconds=5)"));
    let s = Setup::with(
        &flow,
        "",
        "",
        Keys {
            top: "status_interval = 0\nsnapshot_interval = 2",
            default: "persistent_session = true",
            ..Keys::default()
        },
    );
    let r = s.receiver(None);
    let mut agent = s.start_agent("agent-0.log");
    // A paced feed of 800 readings (one mosquitto_pub each, QoS 1), four
    // devices, two readings per device and second: windows 0-9.
    let mut expected = Expected::new();
    let readings: Vec<(String, i64, f64)> = (0..800)
        .map(|i| (format!("d{}", i % 4), (i / 8) as i64, i as f64))
        .collect();
    for (d, offset, temp) in &readings {
        expected
            .entry((d.clone(), offset.div_euclid(10)))
            .or_default()
            .push(*temp);
    }
    let port = s.ingest.port;
    let feed = thread::spawn(move || {
        for (d, offset, temp) in readings {
            runnel_tests::mqtt::publish_on(
                port,
                &format!("sensors/{d}/temp"),
                &reading(T0 + offset, temp, false),
                1,
                &[],
            );
            thread::sleep(Duration::from_millis(4));
        }
    });
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut kills = 0;
    while !feed.is_finished() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        thread::sleep(Duration::from_millis(300 + rng % 700));
        agent.kill9();
        kills += 1;
        agent = Agent::start_logging_to(s.path(), &s.config, &format!("agent-{kills}.log"));
    }
    feed.join().expect("the feed");
    assert!(kills >= 5, "only {kills} kills while the readings flowed");
    close_windows(&s.ingest, &["d0", "d1", "d2", "d3"], 200, false);
    let got = r.wait_until(Duration::from_secs(60), "every window's summary", |m| {
        let mut windows: Vec<(String, i64)> = m
            .iter()
            .map(|m| m.json())
            .filter_map(|v| Some((v["key"].as_str()?.to_string(), v["window"].as_i64()?)))
            .filter(|(_, w)| *w < 10)
            .collect();
        windows.sort();
        windows.dedup();
        windows.len() >= expected.len()
    });
    check_summaries(&got, false, &expected);
    let logs: String = (0..=kills)
        .map(|k| agent_log(s.path(), &format!("agent-{k}.log")))
        .collect();
    assert!(
        logs.contains("restored its state"),
        "no restart restored state:\n{logs}"
    );
    assert!(agent.terminate(STOP_WITHIN).success());
}

/// `decode="nmea"`: a GPS receiver's sentences over MQTT become fields;
/// a sentence with a wrong checksum is counted and skipped.
#[test]
fn nmea_sentences_over_mqtt_become_positions() {
    let flow = r#"
from runnel import Dataflow, op, sources, sinks
flow = Dataflow("gps")
fixes = op.input("in", flow, sources.mqtt("gps/{unit}", decode="nmea"))
op.output("out", fixes, sinks.file("fixes.jsonl"))
"#;
    let s = Setup::new(flow, "", "");
    let mut agent = s.start_agent("agent.log");
    thread::sleep(Duration::from_millis(300));
    s.ingest.publish(
        "gps/u1",
        b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n\
$GPGSV,2,1,08,01,40,083,46,02,17,308,41,12,07,344,39,14,22,228,45*75\r\n\
$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6B\r\n",
        1,
    );
    let out = s.path().join("flows/fixes.jsonl");
    let items = agent.wait_for(ARRIVE_WITHIN, "the GGA fix", || {
        let items = runnel_tests::jsonl_items(&out);
        if items.is_empty() {
            Err("no fix yet".into())
        } else {
            Ok(items)
        }
    });
    assert_eq!(
        items.len(),
        1,
        "GSV passed over, the RMC with a bad checksum skipped: {items:?}"
    );
    let v = &items[0];
    assert_eq!(v["sentence"], json!("GGA"));
    assert_eq!(v["unit"], json!("u1"));
    assert_eq!(v["alt"], json!(545.4));
    assert!((v["lat"].as_f64().unwrap() - 48.1173).abs() < 1e-4, "{v}");
    agent.wait_for_log(ARRIVE_WITHIN, "NMEA checksum mismatch");
    assert!(agent.terminate(STOP_WITHIN).success());
}
