//! The way out to a cluster: one MQTT flow file, run by `runnel run` and
//! by Bytewax 0.21.1 through `flows/bytewax_adapter.py`, against the same
//! mosquitto with the same readings, must publish the same summaries.

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::mqtt::{Broker, Message, Receiver};
use runnel_tests::{bytewax_python, toml_path, workspace_root, write_file, Agent};
use serde_json::Value;

const T0: i64 = 1_704_067_200;

const FLOW: &str = r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("cluster")
readings = op.input("in", flow, sources.mqtt("sensors/{device}/temp"))
keyed = op.key_on("by_device", readings, "device")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=0), unit="s")
tens = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per10s", keyed, clock, tens, {"temp": ["count", "mean", "min", "max", "p90"]})
op.output("up", stats.down, sinks.mqtt("up/{flow}/{key}", broker="upstream"))
"#;

/// The readings both runs get: three devices, windows 0-5, then a closer.
fn publish_readings(b: &Broker) {
    for i in 0..60i64 {
        let device = ["d1", "d2", "d3"][(i % 3) as usize];
        let temp = 15.0 + ((i * 7) % 13) as f64 * 0.5;
        let body = format!("{{\"ts\": {}, \"temp\": {temp}}}", T0 + i);
        b.publish(&format!("sensors/{device}/temp"), body.as_bytes(), 1);
    }
    for d in ["d1", "d2", "d3"] {
        b.publish(
            &format!("sensors/{d}/temp"),
            format!("{{\"ts\": {}, \"temp\": 0}}", T0 + 500).as_bytes(),
            1,
        );
    }
}

/// id → message, for the windows before the closer (window 50 may or may
/// not be flushed, depending on how a run stops).
fn by_id(got: &[Message]) -> BTreeMap<String, Value> {
    got.iter()
        .map(|m| m.json())
        .filter(|v| v["window"].as_i64().unwrap_or(99) < 50)
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect()
}

#[test]
fn one_mqtt_flow_gives_the_same_summaries_on_runnel_and_on_bytewax() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"), "");
    write_file(dir.path(), "flows/flow.py", FLOW);
    let config = write_file(
        dir.path(),
        "runnel.toml",
        &format!(
            "device_id = \"edge-1\"\nflows_dir = {}\nstate_dir = {}\nstatus_interval = 0\n\n\
             [brokers.default]\nhost = \"127.0.0.1\"\nport = {p}\nclient_id = \"ingest\"\n\n\
             [brokers.upstream]\nhost = \"127.0.0.1\"\nport = {p}\nclient_id = \"upstream\"\n",
            toml_path(&dir.path().join("flows")),
            toml_path(&dir.path().join("state")),
            p = broker.port
        ),
    );
    let rdir = dir.path().join("receivers");
    fs::create_dir_all(&rdir).unwrap();

    // runnel
    let r1 = Receiver::start(broker.port, "up/#", &rdir, None);
    let mut agent = Agent::start(dir.path(), &config);
    agent.wait_for_log(Duration::from_secs(20), "connected to broker default");
    publish_readings(&broker);
    let runnel = r1.wait_until(Duration::from_secs(20), "18 summaries from runnel", |m| {
        by_id(m).len() >= 18
    });
    assert!(agent.terminate(Duration::from_secs(5)).success());

    // Bytewax, through the adapter
    let r2 = Receiver::start(broker.port, "up/#", &rdir, None);
    let err = fs::File::create(dir.path().join("bytewax.err")).unwrap();
    let mut bw = Command::new(bytewax_python())
        .arg(workspace_root().join("flows/bytewax_adapter.py"))
        .arg(dir.path().join("flows/flow.py"))
        .args(["--keep-sinks", "--max-seconds", "40", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start the Bytewax adapter");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(dir.path().join("bytewax.err"))
        .unwrap_or_default()
        .contains("subscribed to")
    {
        assert!(Instant::now() < deadline, "the adapter did not subscribe");
        assert!(
            bw.try_wait().unwrap().is_none(),
            "the adapter exited: {}",
            fs::read_to_string(dir.path().join("bytewax.err")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    publish_readings(&broker);
    let bytewax = r2.wait_until(Duration::from_secs(60), "18 summaries from Bytewax", |m| {
        by_id(m).len() >= 18
    });
    let _ = bw.kill();
    let _ = bw.wait();

    let (a, b) = (by_id(&runnel), by_id(&bytewax));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (id, x) in &a {
        let y = &b[id];
        for field in ["key", "window", "device_id", "flow", "step"] {
            assert_eq!(x[field], y[field], "{id}: {field}");
        }
        for stat in ["count", "mean", "min", "max", "p90"] {
            let (p, q) = (&x["value"]["temp"][stat], &y["value"]["temp"][stat]);
            let same = match (p.as_f64(), q.as_f64()) {
                (Some(p), Some(q)) => (p - q).abs() <= 1e-9 * p.abs().max(1.0),
                _ => p == q,
            };
            assert!(same, "{id} {stat}: runnel {p} vs bytewax {q}");
        }
    }
}
