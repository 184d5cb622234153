//! The serial source under `runnel run`, on real pseudo-terminals (socat):
//! JSON, CSV, kv, NMEA and COBS-framed CBOR devices through windows, with
//! garbage between the good lines; a device unplugged and plugged back in at
//! the same path; line noise as from a wrong baud rate.
//!
//! Expected results are computed here from the readings the test sends, not
//! taken from runnel.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use runnel_tests::serial::{cobs, nmea, SerialDevice};
use runnel_tests::{jsonl_items, write_agent_config, write_file, Agent, Rng};
use serde_json::json;
use tempfile::TempDir;

/// 2024-01-01T00:00:00Z in Unix seconds: event times start here.
const T0: i64 = 1_704_067_200;
const STOP_WITHIN: Duration = Duration::from_secs(6);

/// A flow `id` reading `port` with the given `sources.serial` arguments,
/// keyed by `key`, in tumbling windows of `length_s` on the event clock
/// `clock` (`ts_getter` text, `wait` seconds), count and sum of `field` to
/// `<id>.jsonl`, late items to `<id>_late.jsonl` (beside the flow file). `extra` adds lines (after
/// `items` is defined; `keyed_from` is the stream to key).
#[allow(clippy::too_many_arguments)]
fn window_flow(
    id: &str,
    port: &Path,
    serial_args: &str,
    extra: &str,
    keyed_from: &str,
    key: &str,
    clock: &str,
    length_s: u32,
    field: &str,
) -> String {
    format!(
        r#"from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow({id:?})
items = op.input("in", flow, sources.serial({port:?}, {serial_args}))
{extra}
keyed = op.key_on("by_key", {keyed_from}, {key:?})
clock = {clock}
windower = win.TumblingWindower(timedelta(seconds={length_s}), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("stats", keyed, clock, windower, {{{field:?}: ["count", "sum"]}})
op.output("out", stats.down, sinks.file("{id}.jsonl"))
op.output("late", stats.late, sinks.file("{id}_late.jsonl"))
"#,
        port = port.display().to_string(),
    )
}

/// The device's own time ("ts", Unix seconds), with 60 s of wait: a stall of
/// the machine between two readings must not make the second late (closing
/// readings 1000 s ahead still close every window).
const EVENT_CLOCK: &str = r#"win.EventClock("ts", wait_for_system_duration=timedelta(seconds=60), unit="s")"#;

/// A `window_flow` extra: every item read, to `items.jsonl`.
const ITEMS_OUT: &str = r#"op.output("items_out", items, sinks.file("items.jsonl"))"#;

/// Wait until `path` has `n` items (what the agent read so far).
fn wait_items(agent: &mut Agent, path: &Path, n: usize) {
    agent.wait_for(Duration::from_secs(10), &format!("{n} items read"), || {
        let got = jsonl_items(path).len();
        if got >= n {
            Ok(())
        } else {
            Err(format!("{got} of {n}"))
        }
    });
}

/// (key, window id) -> (count, sum), from the flow's output lines
/// `[key, [id, {field: {"count": n, "sum": s}}]]`.
fn windows(path: &Path, field: &str) -> BTreeMap<(String, i64), (u64, f64)> {
    let mut out = BTreeMap::new();
    for v in jsonl_items(path) {
        let key = v[0]
            .as_str()
            .unwrap_or_else(|| panic!("{}: key in {v}", path.display()))
            .to_string();
        let id = v[1][0].as_i64().unwrap_or_else(|| panic!("window id in {v}"));
        let stats = &v[1][1][field];
        let n = stats["count"].as_u64().unwrap_or_else(|| panic!("count in {v}"));
        let s = stats["sum"].as_f64().unwrap_or_else(|| panic!("sum in {v}"));
        assert!(out.insert((key, id), (n, s)).is_none(), "window emitted twice: {v}");
    }
    out
}

/// `windows(out, field)` once it has `n` windows (at most 20 s).
fn wait_windows(
    agent: &mut Agent,
    out: &Path,
    field: &str,
    n: usize,
    what: &str,
) -> BTreeMap<(String, i64), (u64, f64)> {
    agent.wait_for(Duration::from_secs(20), what, || {
        let got = windows(out, field);
        if got.len() >= n {
            Ok(got)
        } else {
            Err(format!("{} of {n} windows", got.len()))
        }
    })
}

/// The counters of the `flow ID stopped:` line the agent logs at SIGTERM.
fn stop_counters(log: &str, flow_id: &str) -> BTreeMap<String, u64> {
    let head = format!("flow {flow_id} stopped:");
    let line = log
        .lines()
        .find(|l| l.contains(&head))
        .unwrap_or_else(|| panic!("no `{head}` line in the log:\n{log}"));
    line[line.find(&head).unwrap() + head.len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_end_matches(',').parse().unwrap_or(0)))
        .collect()
}

/// The wall clock in Unix seconds.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// RFC 3339 text as Unix seconds.
fn seconds_of(text: &str) -> f64 {
    let t = chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    t.timestamp_micros() as f64 / 1e6
}

/// Readings of three sensors, one per second each for 60 s of event time,
/// with values that sum exactly in binary floating point.
fn readings() -> Vec<(String, i64, f64)> {
    let mut out = Vec::new();
    for i in 0..60i64 {
        for (k, key) in ["s1", "s2", "s3"].iter().enumerate() {
            out.push((key.to_string(), T0 + i, (i % 9) as f64 * 0.5 + k as f64 * 10.0));
        }
    }
    out
}

/// What the windows of `readings()` must be: tumbling 10 s.
fn expected(readings: &[(String, i64, f64)]) -> BTreeMap<(String, i64), (u64, f64)> {
    let mut want: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    for (key, ts, t) in readings {
        let w = want.entry((key.clone(), (ts - T0).div_euclid(10))).or_default();
        w.0 += 1;
        w.1 += t;
    }
    want
}

/// Interleave `bad` frames between `good` ones: one after every third good
/// frame (never first, so no bad frame is the first after the port opens).
fn interleave(good: Vec<Vec<u8>>, bad: &[Vec<u8>]) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut n = 0;
    for (i, g) in good.into_iter().enumerate() {
        out.extend(g);
        if i % 3 == 2 {
            out.extend(&bad[(i / 3) % bad.len()]);
            n += 1;
        }
    }
    (out, n)
}

#[test]
fn json_csv_kv_nmea_and_cobs_cbor_devices_go_through_windows_with_garbage_skipped() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let port = |name: &str| dir.join(format!("dev-{name}"));
    // 60 s of wait: a stall of the machine between two readings must not
    // make the second late (the closers, 1000 s ahead, still close all).
    let event_clock = EVENT_CLOCK;
    let json_args = r#"decode="json", max_frame=512"#;
    write_file(
        &flows,
        "json.py",
        &window_flow(
            "json",
            &port("json"),
            json_args,
            "",
            "items",
            "id",
            event_clock,
            10,
            "t",
        ),
    );
    let csv_args = r#"baud=9600, decode="csv", max_frame=512"#;
    write_file(
        &flows,
        "csv.py",
        &window_flow("csv", &port("csv"), csv_args, "", "items", "id", event_clock, 10, "t"),
    );
    let kv_args = r#"baud=57600, parity="even", stop_bits=2, decode="kv", max_frame=512"#;
    write_file(
        &flows,
        "kv.py",
        &window_flow("kv", &port("kv"), kv_args, "", "items", "id", event_clock, 10, "t"),
    );
    let cbor_args = r#"framing="cobs", decode="cbor", max_frame=512"#;
    write_file(
        &flows,
        "cbor.py",
        &window_flow(
            "cbor",
            &port("cbor"),
            cbor_args,
            "",
            "items",
            "id",
            event_clock,
            10,
            "t",
        ),
    );
    // NMEA: RMC fixes windowed on their own time by talker; GGA fixes written out.
    let nmea_extra = r#"rmc = op.filter("rmc", items, lambda f: f["sentence"] == "RMC")
gga = op.filter("gga", items, lambda f: f["sentence"] == "GGA")
op.output("gga_out", gga, sinks.file("gga.jsonl"))"#;
    let nmea_clock = r#"win.EventClock("utc", wait_for_system_duration=timedelta(seconds=60))"#;
    write_file(
        &flows,
        "nmea.py",
        &window_flow(
            "nmea",
            &port("nmea"),
            r#"baud=4800, decode="nmea""#,
            nmea_extra,
            "rmc",
            "talker",
            nmea_clock,
            10,
            "speed_kn",
        ),
    );
    // Raw lines with the time they were read, written out as they come.
    write_file(
        &flows,
        "raw.py",
        &format!(
            "from runnel import Dataflow, op, sources, sinks\nflow = Dataflow(\"raw\")\nitems = op.input(\"in\", flow, sources.serial({:?}, decode=\"raw\", timestamp_field=\"received\"))\nop.output(\"out\", items, sinks.file(\"raw.jsonl\"))\n",
            port("raw").display().to_string()
        ),
    );
    let config = write_agent_config(dir, &flows);
    let mut devices: BTreeMap<&str, SerialDevice> = ["json", "csv", "kv", "cbor", "nmea", "raw"]
        .iter()
        .map(|n| (*n, SerialDevice::plug(&port(n))))
        .collect();
    let mut agent = Agent::start(dir, &config);
    for n in ["json", "csv", "kv", "cbor", "nmea", "raw"] {
        agent.wait_for_log(Duration::from_secs(15), &format!("reading {}", port(n).display()));
    }

    let rs = readings();
    let want = expected(&rs);
    let overlong = [vec![b'x'; 600], b"\n".to_vec()].concat();
    let mut malformed: BTreeMap<&str, u64> = BTreeMap::new();
    // A closing reading per key, far ahead: every earlier window closes.
    let closers = |f: &dyn Fn(&str, i64, f64) -> Vec<u8>| -> Vec<u8> {
        ["s1", "s2", "s3"].iter().flat_map(|k| f(k, T0 + 1000, 0.0)).collect()
    };

    // JSON lines, some ending in \r\n.
    let json_line = |k: &str, ts: i64, t: f64| -> Vec<u8> {
        let end = if ts % 2 == 0 { "\r\n" } else { "\n" };
        format!(
            "{}{end}",
            json!({"id": k, "ts": ts, "t": t, "note": "ok", "pos": [1, 2]})
        )
        .into_bytes()
    };
    let json_bad: Vec<Vec<u8>> = vec![
        b"{\"id\": \"s1\", \"ts\": \n".to_vec(),
        b"\xff\xfe not text\n".to_vec(),
        overlong.clone(),
        b"hello world\n".to_vec(),
    ];
    let (bytes, n) = interleave(rs.iter().map(|(k, ts, t)| json_line(k, *ts, *t)).collect(), &json_bad);
    malformed.insert("json", n);
    devices.get_mut("json").unwrap().send(&bytes);
    devices.get_mut("json").unwrap().send(&closers(&json_line));

    // CSV with a header line first.
    let csv_line = |k: &str, ts: i64, t: f64| format!("{k},{ts},{t}\n").into_bytes();
    let csv_bad: Vec<Vec<u8>> = vec![b"s1,1\n".to_vec(), b"\xff,\xff,\xff\n".to_vec(), overlong.clone()];
    let (bytes, n) = interleave(rs.iter().map(|(k, ts, t)| csv_line(k, *ts, *t)).collect(), &csv_bad);
    malformed.insert("csv", n);
    devices.get_mut("csv").unwrap().send(b"id,ts,t\r\n");
    devices.get_mut("csv").unwrap().send(&bytes);
    devices.get_mut("csv").unwrap().send(&closers(&csv_line));

    // key=value lines, separated by spaces or commas.
    let kv_line = |k: &str, ts: i64, t: f64| format!("id={k} ts={ts},t={t}\n").into_bytes();
    let kv_bad: Vec<Vec<u8>> = vec![
        b"nonsense here\n".to_vec(),
        b"=5 id=s1\n".to_vec(),
        b"\xc3\x28=1\n".to_vec(),
    ];
    let (bytes, n) = interleave(rs.iter().map(|(k, ts, t)| kv_line(k, *ts, *t)).collect(), &kv_bad);
    malformed.insert("kv", n);
    devices.get_mut("kv").unwrap().send(&bytes);
    devices.get_mut("kv").unwrap().send(&closers(&kv_line));

    // COBS frames of CBOR maps.
    let cbor_frame = |k: &str, ts: i64, t: f64| -> Vec<u8> {
        let v = json!({"id": k, "ts": ts, "t": t, "tags": ["a", "b"]});
        let mut f = cobs(&serde_cbor::to_vec(&v).unwrap());
        f.push(0);
        f
    };
    let cbor_bad: Vec<Vec<u8>> = vec![
        vec![0x09, 1, 2, 0],                           // a block longer than the frame
        [cobs(&[0xff, 0x00, 0x13]), vec![0]].concat(), // valid COBS, not CBOR
        [vec![7u8; 600], vec![0]].concat(),            // over max_frame
    ];
    let (bytes, n) = interleave(rs.iter().map(|(k, ts, t)| cbor_frame(k, *ts, *t)).collect(), &cbor_bad);
    malformed.insert("cbor", n);
    devices.get_mut("cbor").unwrap().send(&bytes);
    devices.get_mut("cbor").unwrap().send(&closers(&cbor_frame));

    // NMEA: an RMC and a GGA fix per second from two receivers (talkers GP
    // and GN), a GSV sentence now and then (passed over), bad sentences.
    let mut nmea_text = Vec::new();
    let mut rmc_want: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    let mut gga_want = Vec::new();
    let mut nmea_bad = 0;
    for i in 0..40i64 {
        for (talker, base) in [("GP", 0.0), ("GN", 100.0)] {
            let speed = base + (i % 7) as f64 * 0.5;
            let hhmmss = format!("0000{:02}", i);
            nmea_text.extend(
                nmea(&format!(
                    "{talker}RMC,{hhmmss},A,4807.038,N,01131.000,E,{speed:05.1},084.4,010124,003.1,W"
                ))
                .into_bytes(),
            );
            let w = rmc_want.entry((talker.to_string(), i / 10)).or_default();
            w.0 += 1;
            w.1 += speed;
            let alt = 500.0 + i as f64;
            nmea_text.extend(
                nmea(&format!(
                    "{talker}GGA,{hhmmss},4807.038,N,01131.000,W,1,08,0.9,{alt:.1},M,46.9,M,,"
                ))
                .into_bytes(),
            );
            gga_want.push((talker.to_string(), alt));
        }
        if i % 5 == 1 {
            nmea_text.extend(nmea("GPGSV,2,1,08,01,40,083,46,02,17,308,41,12,07,344,39,14,22,228,45").into_bytes());
            // A checksum that does not match, a sentence without one, noise.
            nmea_text.extend(b"$GPGGA,000001,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*00\r\n");
            nmea_text.extend(b"$GPRMC,000001,A,4807.038,N\r\n");
            nmea_text.extend(b"\x13\x37GPRMC\r\n");
            nmea_bad += 3;
        }
    }
    for talker in ["GP", "GN"] {
        nmea_text.extend(
            nmea(&format!(
                "{talker}RMC,001640,A,4807.038,N,01131.000,E,000.0,084.4,010124,003.1,W"
            ))
            .into_bytes(),
        );
    }
    malformed.insert("nmea", nmea_bad);
    devices.get_mut("nmea").unwrap().send(&nmea_text);

    let raw_sent = now();
    devices
        .get_mut("raw")
        .unwrap()
        .send("héllo 1\r\n\nhello 2\n".as_bytes());
    devices.get_mut("raw").unwrap().send(b"hello\xc3\x28\n");
    devices.get_mut("raw").unwrap().send(b"hello 3\r");
    malformed.insert("raw", 1);

    for id in ["json", "csv", "kv", "cbor"] {
        let out = flows.join(format!("{id}.jsonl"));
        let got = wait_windows(&mut agent, &out, "t", want.len(), &format!("{id}: all windows"));
        assert_eq!(got, want, "{id}: windows differ from the readings sent");
        assert!(
            jsonl_items(&flows.join(format!("{id}_late.jsonl"))).is_empty(),
            "{id}: nothing is late"
        );
    }
    let out = flows.join("nmea.jsonl");
    let got = wait_windows(&mut agent, &out, "speed_kn", rmc_want.len(), "nmea: all windows");
    assert_eq!(got, rmc_want, "nmea: RMC windows");
    let gga: Vec<(String, f64)> = jsonl_items(&flows.join("gga.jsonl"))
        .iter()
        .map(|v| {
            let lon = v["lon"].as_f64().unwrap();
            assert!((lon + 11.0 + 31.0 / 60.0).abs() < 1e-9, "west is negative: {v}");
            assert_eq!(v["utc"].as_str().map(|u| u.len()), Some(8), "GGA time as hh:mm:ss: {v}");
            (v["talker"].as_str().unwrap().to_string(), v["alt"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(gga, gga_want, "nmea: every GGA fix, in order");
    // Raw frames become {"value": text, "received": the time they were read}.
    let raw_out = flows.join("raw.jsonl");
    let raw = agent.wait_for(Duration::from_secs(10), "raw: three lines", || {
        let items = jsonl_items(&raw_out);
        if items.len() >= 3 {
            Ok(items)
        } else {
            Err(format!("{} of 3", items.len()))
        }
    });
    let raw_done = now();
    let texts: Vec<&str> = raw.iter().map(|v| v["value"].as_str().unwrap_or("?")).collect();
    assert_eq!(texts, ["héllo 1", "hello 2", "hello 3"], "{raw:?}");
    for v in &raw {
        let at = seconds_of(v["received"].as_str().unwrap_or_else(|| panic!("received in {v}")));
        assert!(
            raw_sent <= at && at <= raw_done,
            "received {at} not within [{raw_sent}, {raw_done}]: {v}"
        );
    }

    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
    let log = agent.stderr();
    for (id, bad) in &malformed {
        let c = stop_counters(&log, id);
        assert_eq!(
            c.get("in.malformed").copied().unwrap_or(0),
            *bad,
            "{id}: malformed frames counted: {c:?}"
        );
        assert_eq!(c.get("in.partial_frames"), None, "{id}: {c:?}");
        assert_eq!(c.get("in.disconnects"), None, "{id}: {c:?}");
    }
    assert!(log.contains("frame longer than max_frame (512 bytes)"), "{log}");
    assert!(log.contains("NMEA checksum mismatch"), "{log}");
    assert!(!log.contains("panic"), "{log}");
}

/// A kv device keyed "a", windows of 1 s on the receive time (`received`)
/// with 0.5 s of wait.
fn receive_time_flow(port: &Path) -> String {
    window_flow(
        "unplug",
        port,
        r#"decode="kv", timestamp_field="received""#,
        "",
        "items",
        "id",
        r#"win.EventClock("received", wait_for_system_duration=timedelta(milliseconds=500))"#,
        1,
        "n",
    )
}

/// Total count and sum over every window of `out`.
fn totals(out: &Path) -> (u64, f64) {
    windows(out, "n")
        .values()
        .fold((0, 0.0), |(c, s), (n, x)| (c + n, s + x))
}

#[test]
fn a_device_unplugged_and_plugged_back_at_the_same_path_loses_no_window() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    // The agent reads a by-id style symlink; socat makes the pty behind it.
    let link = dir.join("serial-by-id-usb-test-if00");
    write_file(&flows, "unplug.py", &receive_time_flow(&link));
    let config = write_agent_config(dir, &flows);
    // The device is not there when the agent starts.
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), &format!("waiting for {}", link.display()));
    std::thread::sleep(Duration::from_millis(800));
    let mut device = SerialDevice::plug(&link);
    agent.wait_for_log(Duration::from_secs(10), &format!("reading {}", link.display()));
    let out = flows.join("unplug.jsonl");
    let mut sent = (0u64, 0.0f64);
    let first_sent = now();
    for i in 0..20 {
        device.send(format!("id=a n={i}\n").as_bytes());
        sent.0 += 1;
        sent.1 += i as f64;
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cable is pulled in the middle of a line.
    device.send(b"id=a n=9");
    std::thread::sleep(Duration::from_millis(600));
    device.unplug();
    let pulled = Instant::now();
    agent.wait_for_log(Duration::from_secs(5), "went away");
    // While the device is away, the windows of what it sent close on time.
    let before = agent.wait_for(Duration::from_secs(4), "the windows before the cut to close", || {
        let t = totals(&out);
        if t.0 >= sent.0 {
            Ok(t)
        } else {
            Err(format!("{t:?} of {sent:?}"))
        }
    });
    assert_eq!(before, sent, "every reading before the cut is in a closed window");
    let closed_after = pulled.elapsed();
    assert!(
        closed_after < Duration::from_secs(3),
        "closed {closed_after:?} after the cut"
    );
    // Stay away a while longer: several attempts to open the absent port.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(pulled.elapsed()));
    device.replug();
    agent.wait_for_log(Duration::from_secs(10), &format!("reading {} again", link.display()));
    for i in 100..120 {
        device.send(format!("id=a n={i}\n").as_bytes());
        sent.0 += 1;
        sent.1 += i as f64;
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = agent.wait_for(Duration::from_secs(5), "the windows after the return to close", || {
        let t = totals(&out);
        if t.0 >= sent.0 {
            Ok(t)
        } else {
            Err(format!("{t:?} of {sent:?}"))
        }
    });
    let last_sent = now();
    assert_eq!(after, sent, "every reading before and after the cut, once");
    // Windows are 1 s of receive time: each one's id lies within the sending.
    for (_, id) in windows(&out, "n").keys() {
        let start = (T0 + id) as f64;
        assert!(
            start + 1.0 > first_sent && start <= last_sent,
            "window {id} ({start}) is outside the time the readings were sent ({first_sent}..{last_sent})"
        );
    }
    assert!(
        jsonl_items(&flows.join("unplug_late.jsonl")).is_empty(),
        "nothing is late"
    );

    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
    let log = agent.stderr();
    let waiting = format!("waiting for {}", link.display());
    // Once before the device first came, once for the cut: not per attempt.
    assert_eq!(log.matches(&waiting).count(), 2, "{log}");
    assert_eq!(
        log.matches(&format!("reading {} again", link.display())).count(),
        1,
        "{log}"
    );
    let c = stop_counters(&log, "unplug");
    assert_eq!(
        c.get("in.partial_frames"),
        Some(&1),
        "the cut line is dropped and counted: {c:?}"
    );
    assert_eq!(c.get("in.disconnects"), Some(&1), "{c:?}");
    assert_eq!(c.get("in.items"), Some(&sent.0), "{c:?}");
    assert_eq!(c.get("in.malformed"), None, "{c:?}");
}

#[test]
fn line_noise_between_readings_is_counted_and_the_readings_still_count() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let link = dir.join("noisy");
    let clock = EVENT_CLOCK;
    write_file(
        &flows,
        "noise.py",
        &window_flow(
            "noise",
            &link,
            r#"decode="kv", max_frame=256"#,
            "",
            "items",
            "id",
            clock,
            10,
            "t",
        ),
    );
    let config = write_agent_config(dir, &flows);
    let mut device = SerialDevice::plug(&link);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), &format!("reading {}", link.display()));
    let mut rng = Rng(0x5eed_5e71a1);
    let rs = readings();
    let mut bytes = Vec::new();
    let mut bursts = 0;
    for (i, (k, ts, t)) in rs.iter().enumerate() {
        bytes.extend(format!("id={k} ts={ts} t={t}\n").into_bytes());
        if i % 4 == 3 {
            // What a receiver at the wrong baud rate makes of a line: bytes
            // of every value, then the end of a line. Never the text "id=s".
            let len = 1 + rng.below(300) as usize;
            let mut burst: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            burst.retain(|b| *b != b'=');
            burst.push(b'\n');
            bytes.extend(burst);
            bursts += 1;
        }
    }
    bytes.extend(b"id=s1 ts=1704068200 t=0\nid=s2 ts=1704068200 t=0\nid=s3 ts=1704068200 t=0\n");
    for chunk in bytes.chunks(700) {
        device.send(chunk);
    }
    let out = flows.join("noise.jsonl");
    let want = expected(&rs);
    let got = wait_windows(&mut agent, &out, "t", want.len(), "all windows");
    assert_eq!(got, want, "the readings between the noise");
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
    let c = stop_counters(&agent.stderr(), "noise");
    // A burst may hold line ends of its own (more frames), and a frame of
    // only blanks is passed over, so the count is at least most bursts.
    let bad = c.get("in.malformed").copied().unwrap_or(0);
    assert!(bad >= bursts * 9 / 10, "{bad} malformed for {bursts} bursts: {c:?}");
    assert_eq!(c.get("in.items"), Some(&(rs.len() as u64 + 3)), "{c:?}");
}

#[test]
fn serial_inputs_need_the_agent_and_bad_arguments_are_refused_when_checked() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flow = write_file(
        dir,
        "flow.py",
        "from runnel import Dataflow, op, sources, sinks\nflow = Dataflow(\"s\")\nx = op.input(\"in\", flow, sources.serial(\"/dev/ttyUSB9\", baud=9600, decode=\"nmea\"))\nop.output(\"out\", x, sinks.stdout())\n",
    );
    let check = runnel_tests::run_ok(
        runnel_tests::runnel_command(dir).arg("check").arg(&flow),
        Duration::from_secs(30),
    );
    let text = check.stdout_text();
    assert!(
        text.contains("input serial /dev/ttyUSB9 9600 8N1 flow control none (lines framing, nmea)"),
        "{text}"
    );
    let replay = runnel_tests::run_with_timeout(
        runnel_tests::runnel_command(dir).arg("replay").arg(&flow),
        Duration::from_secs(30),
    );
    assert!(!replay.success(), "{}", runnel_tests::show(&replay));
    assert!(
        replay.stderr_text().contains("--input in=FILE"),
        "{}",
        runnel_tests::show(&replay)
    );
    for (args, needle) in [
        (r#""/dev/x", decode="cbor""#, "needs framing=\"cobs\""),
        (r#""/dev/x", baud=0"#, "`baud` must be"),
        (r#""/dev/x", framing="cobs", decode="csv""#, "needs columns=[...]"),
        (r#""/dev/x", parity="mark""#, "`parity` must be"),
        (r#""/dev/x", max_frame=4"#, "`max_frame` must be"),
        (r#""/dev/x", columns=["a"]"#, "only for decode=\"csv\""),
        (r#""""#, "non-empty str"),
    ] {
        let bad = write_file(
            dir,
            "bad.py",
            &format!("from runnel import Dataflow, op, sources, sinks\nflow = Dataflow(\"s\")\nx = op.input(\"in\", flow, sources.serial({args}))\nop.output(\"out\", x, sinks.stdout())\n"),
        );
        let done = runnel_tests::run_with_timeout(
            runnel_tests::runnel_command(dir).arg("check").arg(&bad),
            Duration::from_secs(30),
        );
        assert!(!done.success(), "{args}: {}", runnel_tests::show(&done));
        assert!(
            done.stderr_text().contains(needle) || done.stdout_text().contains(needle),
            "{args}: {}",
            runnel_tests::show(&done)
        );
    }
}

#[test]
fn a_busy_port_is_waited_for_a_cut_first_frame_is_partial_and_a_re_pointed_link_is_followed() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let link = dir.join("gps");
    let clock = EVENT_CLOCK;
    write_file(
        &flows,
        "moves.py",
        &window_flow(
            "moves",
            &link,
            r#"decode="json""#,
            ITEMS_OUT,
            "items",
            "id",
            clock,
            10,
            "t",
        ),
    );
    let config = write_agent_config(dir, &flows);
    let mut a = SerialDevice::plug(&link);
    // Another program holds the port's lock (as `flock` or a serial
    // terminal would): runnel says it is busy and waits.
    // -o: the lock stays with flock (not its child), and goes when it is killed.
    let holder = std::process::Command::new("flock")
        .arg("-x")
        .arg("-o")
        .arg(a.pts())
        .arg("sleep")
        .arg("30")
        .spawn()
        .expect("run flock (util-linux)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut holder = Kill(holder);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), "is busy: another program has it open");
    let _ = holder.0.kill();
    let _ = holder.0.wait();
    agent.wait_for_log(Duration::from_secs(10), &format!("reading {}", link.display()));
    // The first bytes are the tail of a line the device was sending.
    let mut readings = Vec::new();
    let mut bytes = b"\"t\": 5.5}\n".to_vec();
    for i in 0..30i64 {
        readings.push(("s1".to_string(), T0 + i, (i % 4) as f64));
        bytes.extend(format!("{}\n", json!({"id": "s1", "ts": T0 + i, "t": (i % 4) as f64})).into_bytes());
    }
    a.send(&bytes);
    let out = flows.join("moves.jsonl");
    // Everything sent is read before the link moves (or it would be cut).
    wait_items(&mut agent, &flows.join("items.jsonl"), 30);
    // The link is pointed at another device while the first one is still
    // there (udev re-creating a by-id link): once the first is silent,
    // runnel notices and follows the link.
    let b = SerialDevice::plug(&dir.join("gps-new"));
    let tmp_link = dir.join("gps.tmp");
    std::os::unix::fs::symlink(b.pts(), &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    agent.wait_for_log(Duration::from_secs(10), "the path now names another device");
    let mut b = b;
    let mut more = Vec::new();
    for i in 30..60i64 {
        readings.push(("s1".to_string(), T0 + i, (i % 4) as f64));
        more.extend(format!("{}\n", json!({"id": "s1", "ts": T0 + i, "t": (i % 4) as f64})).into_bytes());
    }
    more.extend(format!("{}\n", json!({"id": "s1", "ts": T0 + 1000, "t": 0.0})).into_bytes());
    b.send(&more);
    let want = expected(&readings);
    let got = wait_windows(&mut agent, &out, "t", want.len(), "every window");
    assert_eq!(got, want);
    agent.wait_for_log(Duration::from_secs(5), &format!("reading {} again", link.display()));
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
    let c = stop_counters(&agent.stderr(), "moves");
    assert_eq!(c.get("in.partial_frames"), Some(&1), "the cut first line: {c:?}");
    assert_eq!(c.get("in.malformed"), None, "{c:?}");
    assert_eq!(c.get("in.disconnects"), Some(&1), "{c:?}");
    assert_eq!(c.get("in.items"), Some(&61), "{c:?}");
    drop(a);
}

#[test]
fn a_csv_header_after_a_boot_message_is_found_and_kept_when_the_device_comes_back() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let link = dir.join("meter");
    let clock = EVENT_CLOCK;
    write_file(
        &flows,
        "meter.py",
        &window_flow(
            "meter",
            &link,
            r#"decode="csv""#,
            ITEMS_OUT,
            "items",
            "id",
            clock,
            10,
            "t",
        ),
    );
    let config = write_agent_config(dir, &flows);
    let mut device = SerialDevice::plug(&link);
    let mut agent = Agent::start(dir, &config);
    agent.wait_for_log(Duration::from_secs(15), &format!("reading {}", link.display()));
    let rows = |from: i64, to: i64| -> (Vec<(String, i64, f64)>, String) {
        let rs: Vec<(String, i64, f64)> = (from..to)
            .map(|i| ("m1".to_string(), T0 + i, (i % 5) as f64 + 0.5))
            .collect();
        let text = rs.iter().map(|(k, ts, t)| format!("{k},{ts},{t}\n")).collect();
        (rs, text)
    };
    let out = flows.join("meter.jsonl");
    let mut readings = Vec::new();
    // First opening: an ESP32-style boot message (two cells, no numbers:
    // it looks like a header until the next line has three), the header,
    // then rows.
    let (rs, text) = rows(0, 20);
    device.send(format!("rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\nid,ts,t\n{text}").as_bytes());
    readings.extend(rs);
    agent.wait_for_log(Duration::from_secs(10), "CSV columns from line 2: id, ts, t");
    let items = flows.join("items.jsonl");
    wait_items(&mut agent, &items, 20);
    device.unplug();
    agent.wait_for_log(Duration::from_secs(5), "went away");
    // Back after a reset: the header again (passed over), then rows.
    device.replug();
    agent.wait_for_log(Duration::from_secs(10), &format!("reading {} again", link.display()));
    let (rs, text) = rows(20, 40);
    device.send(format!("id,ts,t\n{text}").as_bytes());
    readings.extend(rs);
    wait_items(&mut agent, &items, 40);
    device.unplug();
    // Back without a reset: rows only, read with the header kept.
    device.replug();
    let (rs, text) = rows(40, 60);
    device.send(format!("{text}m1,{},0\n", T0 + 1000).as_bytes());
    readings.extend(rs);
    let want = expected(&readings);
    let got = wait_windows(&mut agent, &out, "t", want.len(), "every window");
    assert_eq!(got, want);
    assert_eq!(agent.terminate(STOP_WITHIN).code(), Some(0), "{}", agent.stderr());
    let log = agent.stderr();
    let c = stop_counters(&log, "meter");
    assert_eq!(c.get("in.malformed"), None, "{c:?}\n{log}");
    assert_eq!(
        c.get("in.partial_frames"),
        Some(&1),
        "the boot message, first after opening: {c:?}"
    );
    assert_eq!(c.get("in.items"), Some(&61), "{c:?}");
    assert_eq!(log.matches("CSV columns from line").count(), 1, "{log}");
    assert_eq!(c.get("in.repeated_headers"), Some(&1), "{c:?}");
}
