#!/usr/bin/env python3
"""End-to-end check of flows/bytewax_adapter.py's MQTT source and sink.

    .venv-test/bin/python tests/oracle/mqtt_adapter_check.py [--keep]

Needs the Python that has bytewax 0.21.1 and paho-mqtt 2.x, and mosquitto
(`/usr/sbin/mosquitto` or on PATH). Starts its own mosquitto on a free
loopback port, then, for decode/encode "json" and then "cbor", writes a
runnel.toml and a flow

    sources.mqtt("sensors/{device}/temp") -> op.key_on("device")
    -> win.aggregate(EventClock("ts", 0 s, unit="s"), 10 s tumbling windows
       aligned to 2024-01-01 UTC, temp: count/mean/min/max)
    -> sinks.mqtt("up/{device_id}/{key}", broker="upstream")

runs the adapter on it with `--keep-sinks --max-seconds`, publishes
readings (paho, QoS 1), subscribes to `up/#` and checks every envelope
field by field against windows computed here. Also checks the adapter's
payload decoders (csv, kv, raw, cbor) directly. Exit status 0 if all
passed, 1 with a message naming what differs otherwise. Every wait has a
timeout, and a watchdog ends the run after 240 s; mosquitto and the adapter
are always stopped (`--keep` keeps the temp folder).
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADAPTER = os.path.join(ROOT, "flows", "bytewax_adapter.py")
T0 = 1704067200  # 2024-01-01T00:00:00Z
DEVICE_ID = "edge-7"
FLOW_ID = "edge.check"  # a `.`: the envelope must carry runnel's id, not Bytewax's
MAX_SECONDS = 8
WATCHDOG = 240

CHILDREN = []  # Popen objects to stop on exit


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def stop(proc, name):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"mqtt_adapter_check: could not stop {name} (pid {proc.pid})", file=sys.stderr)


def watchdog():
    print(f"mqtt_adapter_check: FAILED: still running after {WATCHDOG} s", file=sys.stderr)
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
    os._exit(1)


# ---------------------------------------------------------------------------
# A tiny CBOR codec of our own (independent of the adapter's); cbor2 decodes
# the envelopes instead when it is installed.
# ---------------------------------------------------------------------------


class Tag:
    def __init__(self, tag, value):
        self.tag, self.value = tag, value


class Half:
    def __init__(self, value):
        self.value = value


def cbor_enc(v, out=None):
    out = bytearray() if out is None else out

    def head(major, n):
        for limit, ai, size in ((24, None, 0), (1 << 8, 24, 1), (1 << 16, 25, 2), (1 << 32, 26, 4), (1 << 64, 27, 8)):
            if n < limit:
                out.append(major << 5 | (n if ai is None else ai))
                out.extend(n.to_bytes(size, "big") if size else b"")
                return

    if v is None:
        out.append(0xF6)
    elif isinstance(v, bool):
        out.append(0xF5 if v else 0xF4)
    elif isinstance(v, int):
        head(0, v) if v >= 0 else head(1, -1 - v)
    elif isinstance(v, Half):
        out.append(0xF9)
        out.extend(struct.pack(">e", v.value))
    elif isinstance(v, float):
        out.append(0xFB)
        out.extend(struct.pack(">d", v))
    elif isinstance(v, str):
        b = v.encode()
        head(3, len(b))
        out.extend(b)
    elif isinstance(v, bytes):
        head(2, len(v))
        out.extend(v)
    elif isinstance(v, Tag):
        head(6, v.tag)
        cbor_enc(v.value, out)
    elif isinstance(v, list):
        head(4, len(v))
        for x in v:
            cbor_enc(x, out)
    elif isinstance(v, dict):
        head(5, len(v))
        for k, x in v.items():
            cbor_enc(k, out)
            cbor_enc(x, out)
    else:
        raise TypeError(v)
    return bytes(out)


def cbor_dec(data):
    def item(pos):
        ib = data[pos]
        major, ai = ib >> 5, ib & 31
        pos += 1
        if ai < 24:
            n = ai
        elif ai <= 27:
            size = 1 << (ai - 24)
            n = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        else:
            raise ValueError(f"unsupported CBOR byte {ib:#x}")
        if major == 0:
            return n, pos
        if major == 1:
            return -1 - n, pos
        if major in (2, 3):
            raw = data[pos:pos + n]
            return (raw.decode() if major == 3 else raw), pos + n
        if major == 4:
            out = []
            for _ in range(n):
                x, pos = item(pos)
                out.append(x)
            return out, pos
        if major == 5:
            out = {}
            for _ in range(n):
                k, pos = item(pos)
                out[k], pos = item(pos)
            return out, pos
        if major == 6:
            return item(pos)
        if ai in (20, 21, 22):
            return {20: False, 21: True, 22: None}[ai], pos
        if ai in (25, 26, 27):
            fmt = {25: ">e", 26: ">f", 27: ">d"}[ai]
            return struct.unpack(fmt, n.to_bytes(struct.calcsize(fmt), "big"))[0], pos
        raise ValueError(f"unsupported CBOR byte {ib:#x}")

    v, end = item(0)
    if end != len(data):
        raise ValueError("trailing bytes")
    return v


def decode_envelope(encode, payload):
    if encode == "json":
        return json.loads(payload.decode("utf-8"))
    try:
        import cbor2
    except ImportError:
        return cbor_dec(payload)
    return cbor2.loads(payload)


# ---------------------------------------------------------------------------
# The broker, the flow, the readings
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(tmp):
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    expect(exe is not None, "mosquitto not found (apt-get install mosquitto)")
    port = free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = open(os.path.join(tmp, "mosquitto.log"), "wb")
    proc = subprocess.Popen([exe, "-c", conf], stdout=log, stderr=subprocess.STDOUT)
    CHILDREN.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        expect(proc.poll() is None, f"mosquitto exited at start; see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    raise CheckFailed(f"mosquitto did not listen on 127.0.0.1:{port} within 10 s")


FLOW = """\
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, sinks, sources, win

flow = Dataflow({flow_id!r})
temps = op.input("temps", flow, sources.mqtt("sensors/{{device}}/temp", decode={encode!r}))
by_device = op.key_on("by_device", temps, "device")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=0), unit="s")
tens = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per_10s", by_device, clock, tens, {{"temp": ["count", "mean", "min", "max"]}})
op.output("up", stats.down, sinks.mqtt("up/{{device_id}}/{{key}}", broker="upstream", encode={encode!r}))
"""

CONFIG = """\
device_id = {device_id!r}
state_dir = "state"
max_outbox_bytes = 1000000
log_level = "info"

[brokers.default]
host = "127.0.0.1"
port = {port}

[brokers.upstream]
host = "127.0.0.1"
port = {port}
client_id = "mqtt-adapter-check-{encode}"
keepalive = 15
"""

# (device, ts offset from T0, temp) in publish order, which is global ts
# order: with wait 0 s no reading is late. A temp of None: no "temp" field.
READINGS = [
    ("d1", 1, 20.5), ("d2", 2, 18), ("d1", 3, 21.25), ("d1", 4, None), ("d2", 7, 19.5),
    ("d1", 9, 22), ("d1", 11, 23.5), ("d2", 12, -1.75), ("d3", 13, 5), ("d1", 16, 24),
    ("d2", 18, 0.1), ("d3", 24, 7.5), ("d1", 27, 25.125), ("d3", 29, 8),
]


def payloads(encode):
    """[(topic, payload bytes)]: the readings, plus messages that must not
    produce items (malformed, another topic)."""
    out = []
    for i, (dev, off, temp) in enumerate(READINGS):
        msg = {"ts": T0 + off, "device": "overwritten by the topic"}
        if temp is not None:
            msg["temp"] = temp
        if encode == "json":
            body = json.dumps(msg).encode()
        else:
            if i % 3 == 0:
                msg["ts"] = Tag(1, msg["ts"])  # tags are ignored
            if isinstance(temp, float) and i % 2 == 0 and struct.unpack(">e", struct.pack(">e", temp))[0] == temp:
                msg["temp"] = Half(temp)  # a half-width float
            body = cbor_enc(msg)
        out.append((f"sensors/{dev}/temp", body))
        if i == 4:
            out.append(("sensors/d1/temp", b"{not json" if encode == "json" else b"\xa1\x01\x02"))
            out.append(("sensors/d1/humidity", json.dumps({"ts": T0 + 7, "temp": 99}).encode()
                        if encode == "json" else cbor_enc({"ts": T0 + 7, "temp": 99})))
    return out


def expected_windows():
    """{(device, window id): {"count", "mean", "min", "max"}}."""
    acc = {}
    for dev, off, temp in READINGS:
        vals = acc.setdefault((dev, off // 10), [])
        if temp is not None:
            vals.append(temp)
    out = {}
    for k, vals in acc.items():
        out[k] = {
            "count": len(vals),
            "mean": sum(vals) / len(vals) if vals else None,
            "min": float(min(vals)) if vals else None,
            "max": float(max(vals)) if vals else None,
        }
    return out


class Lines:
    """Collect a pipe's lines in a thread."""

    def __init__(self, pipe):
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe):
        for raw in pipe:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def text(self):
        with self.cond:
            return "\n".join(self.lines)


def paho_client(client_id):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)


def run_case(tmp, port, encode):
    case = os.path.join(tmp, encode)
    os.makedirs(case)
    flow_path = os.path.join(case, "flow.py")
    with open(flow_path, "w") as f:
        f.write(FLOW.format(flow_id=FLOW_ID, encode=encode))
    config = os.path.join(case, "runnel.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(device_id=DEVICE_ID, port=port, encode=encode))

    # The receiver of the envelopes, subscribed before the flow starts.
    got, got_lock, subscribed = [], threading.Lock(), threading.Event()
    sub = paho_client(f"check-sub-{encode}")

    def on_message(client, userdata, msg):
        with got_lock:
            got.append((msg.topic, msg.payload, msg.retain))

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda client, userdata, flags, rc, props: client.subscribe("up/#", qos=1)
    sub.connect("127.0.0.1", port, 15)
    sub.loop_start()
    pub = None
    adapter = None
    try:
        expect(subscribed.wait(10), f"[{encode}] the check's subscriber got no SUBACK within 10 s")

        adapter = subprocess.Popen(
            [sys.executable, ADAPTER, flow_path, "--config", config, "--keep-sinks", "--max-seconds", str(MAX_SECONDS)],
            cwd=case, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        CHILDREN.append(adapter)
        out, err = Lines(adapter.stdout), Lines(adapter.stderr)
        if not err.wait_for("subscribed to 'sensors/+/temp'", 60):
            raise CheckFailed(f"[{encode}] the adapter did not subscribe within 60 s; its stderr:\n{err.text()}")

        pub = paho_client(f"check-pub-{encode}")
        pub.connect("127.0.0.1", port, 15)
        pub.loop_start()
        for topic, body in payloads(encode):
            info = pub.publish(topic, body, qos=1)
            info.wait_for_publish(10)
            expect(info.is_published(), f"[{encode}] publishing to {topic} was not acknowledged within 10 s")

        try:
            rc = adapter.wait(MAX_SECONDS + 60)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"[{encode}] the adapter did not end within {MAX_SECONDS + 60} s of --max-seconds "
                              f"{MAX_SECONDS}; its stderr:\n{err.text()}") from None
        time.sleep(0.2)  # let the pipe readers finish
        expect(rc == 0, f"[{encode}] the adapter exited {rc}; its stderr:\n{err.text()}")
        expect(out.text() == "", f"[{encode}] --keep-sinks printed on stdout:\n{out.text()}")
        expect("skipped malformed" in err.text(),
               f"[{encode}] no warning about the malformed message; stderr:\n{err.text()}")

        want = expected_windows()
        deadline = time.monotonic() + 10  # the adapter waited for PUBACKs; delivery to us is quick
        while time.monotonic() < deadline:
            with got_lock:
                if len(got) >= len(want):
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # anything extra would show up now
        with got_lock:
            received = list(got)
    finally:
        for c in (pub, sub):
            if c is not None:
                c.disconnect()
                c.loop_stop()
        if adapter is not None:
            stop(adapter, "the adapter")

    check_envelopes(encode, received, want)
    print(f"mqtt_adapter_check: {encode}: {len(received)} envelopes as expected")


FIELDS = ["id", "seq", "device_id", "flow", "step", "key", "window", "value"]


def close(a, b):
    if a is None or b is None:
        return a is b
    return isinstance(a, float) and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def check_envelopes(encode, received, want):
    expect(len(received) == len(want),
           f"[{encode}] received {len(received)} envelopes, want {len(want)} (one per device and window): "
           f"{[t for t, _, _ in received]}")
    seen = {}
    last_seq = 0
    for topic, payload, retain in received:
        where = f"[{encode}] envelope on {topic}"
        try:
            env = decode_envelope(encode, payload)
        except Exception as ex:  # noqa: BLE001
            raise CheckFailed(f"{where}: does not decode as {encode}: {ex}: {payload!r}") from None
        expect(isinstance(env, dict), f"{where}: not an object: {env!r}")
        expect(list(env) == FIELDS, f"{where}: fields {list(env)}, want {FIELDS} in that order")
        key, window = env["key"], env["window"]
        expect(isinstance(key, str) and isinstance(window, int) and not isinstance(window, bool),
               f"{where}: key {key!r} / window {window!r}")
        expect(topic == f"up/{DEVICE_ID}/{key}", f"{where}: topic, want up/{DEVICE_ID}/{key}")
        expect(not retain, f"{where}: retained")
        expect(env["id"] == f"{DEVICE_ID}/{FLOW_ID}/up/{key}/{window}", f"{where}: id {env['id']!r}")
        expect(env["device_id"] == DEVICE_ID, f"{where}: device_id {env['device_id']!r}")
        expect(env["flow"] == FLOW_ID, f"{where}: flow {env['flow']!r}, want {FLOW_ID!r}")
        expect(env["step"] == "up", f"{where}: step {env['step']!r}")
        seq = env["seq"]
        expect(isinstance(seq, int) and seq > last_seq, f"{where}: seq {seq!r} after {last_seq}")
        last_seq = seq
        expect((key, window) in want, f"{where}: unexpected window ({key!r}, {window}); want {sorted(want)}")
        expect((key, window) not in seen, f"{where}: ({key!r}, {window}) received twice")
        seen[(key, window)] = env
        value = env["value"]
        expect(isinstance(value, dict) and list(value) == ["temp"], f"{where}: value {value!r}")
        stats, exp = value["temp"], want[(key, window)]
        expect(isinstance(stats, dict) and set(stats) == set(exp), f"{where}: stats {stats!r}, want {exp!r}")
        expect(stats["count"] == exp["count"] and isinstance(stats["count"], int),
               f"{where}: count {stats['count']!r}, want {exp['count']}")
        for s in ("mean", "min", "max"):
            expect(close(stats[s], exp[s]), f"{where}: {s} {stats[s]!r}, want {exp[s]!r}")
    expect(sorted(e["seq"] for e in seen.values()) == list(range(1, len(want) + 1)),
           f"[{encode}] seqs {sorted(e['seq'] for e in seen.values())}, want 1..{len(want)}")


# ---------------------------------------------------------------------------
# The adapter's decoders, directly
# ---------------------------------------------------------------------------


def check_decoders():
    spec = importlib.util.spec_from_file_location("bytewax_adapter", ADAPTER)
    ad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ad)
    dec, Malformed = ad.decode_payload, ad._Malformed

    def malformed(payload, decode):
        try:
            dec(payload, decode)
        except Malformed:
            return True
        return False

    items, problems = dec(b"ts,temp,id\r\n1,21.5,a\n\n2,,b,extra\n9223372036854775808,inf,-7\n", "csv")
    expect(items == [{"ts": 1, "temp": 21.5, "id": "a"}, {"ts": 9.223372036854776e18, "temp": "inf", "id": -7}]
           and len(problems) == 1, f"csv: {items} {problems}")
    items, _ = dec(b"5,x\n", "csv", ["n", "s"])
    expect(items == [{"n": 5, "s": "x"}], f"csv with columns: {items}")
    items, problems = dec(b"id=a1 t=21.5, h=40\n\n   \nid=a2 oops\nk= z=1e3\n", "kv")
    expect(items == [{"id": "a1", "t": 21.5, "h": 40}, {"k": None, "z": 1000.0}] and len(problems) == 1,
           f"kv: {items} {problems}")
    expect(dec("héllo".encode(), "raw")[0] == ["héllo"], "raw")
    for d in ("raw", "json", "csv", "kv"):
        expect(malformed(b"\xff\xfe", d), f"{d}: invalid UTF-8 not malformed")
    expect(malformed(b"NaN", "json") and malformed(b"[1,", "json"), "json: NaN / truncated not malformed")
    expect(dec(cbor_enc({"a": [1, -2, Half(1.5), None, True, "t", b"by"]}), "cbor")[0]
           == [{"a": [1, -2, 1.5, None, True, "t", "by"]}], "cbor: basic items")
    expect(dec(bytes.fromhex("d8 20 a1 c1 61 6b f7".replace(" ", "")), "cbor")[0] == [{"k": None}],
           "cbor: tags and undefined")
    for bad in ("a1 01 02", "42 80 ff", "01 02", "a1", "ff", "f0"):
        expect(malformed(bytes.fromhex(bad.replace(" ", "")), "cbor"), f"cbor: {bad} not malformed")
    env, key = ad.mqtt_envelope(("k", ["not", "a window"]), 4, "dev", "fl", "st")
    expect(key == "k" and list(env) == ["id", "seq", "device_id", "flow", "step", "key", "value"]
           and env["id"] == "dev/fl/st/k/#4", f"keyed envelope: {env}")
    env, key = ad.mqtt_envelope(7, 5, "dev", "fl", "st")
    expect(key is None and env == {"id": "dev/fl/st/#5", "seq": 5, "device_id": "dev", "flow": "fl",
                                   "step": "st", "value": 7}, f"plain envelope: {env}")
    expect(ad._topic_key("a/b+c#") == "a_b_c_" and ad._topic_key("") == "_", "key in topic")
    print("mqtt_adapter_check: decoders as expected")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    timer = threading.Timer(WATCHDOG, watchdog)
    timer.daemon = True
    timer.start()
    tmp = tempfile.mkdtemp(prefix="mqtt-adapter-check-")
    broker = None
    try:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError:
            raise CheckFailed(f"{sys.executable} has no paho-mqtt (pip install paho-mqtt==2.1.0)") from None
        check_decoders()
        broker, port = start_mosquitto(tmp)
        for encode in ("json", "cbor"):
            run_case(tmp, port, encode)
    except CheckFailed as ex:
        print(f"mqtt_adapter_check: FAILED: {ex}", file=sys.stderr)
        if args.keep:
            print(f"mqtt_adapter_check: files in {tmp}", file=sys.stderr)
        return 1
    finally:
        for p in CHILDREN:
            stop(p, "mosquitto" if p is broker else "the adapter")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        timer.cancel()
    print("mqtt_adapter_check: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
