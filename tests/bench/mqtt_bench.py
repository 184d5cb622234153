#!/usr/bin/env python3
"""Benchmark: MQTT ingest into `runnel run`, against mosquitto_sub on the same stream.

What it measures
----------------
A private mosquitto gets N readings (default 200,000) from K devices (default
500) from a publisher in this script. In the same run two consumers take the
same stream: `runnel run` with tests/bench/mqtt_flow.py (key on the device in
the topic, 10 s tumbling event-time windows, wait 1 s, win.aggregate; results
and late readings go back to the same broker as broker "upstream", QoS 1), and
`mosquitto_sub` (the C client: the yardstick for "keeping up"). For each QoS
(0, 1: the publisher, runnel's subscription and mosquitto_sub all use it) and
each publisher pace (--rate) it reports:

  received  readings runnel accounted for: the sum of `temp.count` over the
            window results plus the number of late results, after dropping
            duplicates by (step, seq) as the README tells receivers to. At QoS 1
            it must be exactly N (zero loss).
  rates     messages/s of each consumer: M / (time the consumer had the whole
            stream - time of the first PUBLISH), M = N readings + K closing
            readings (below). mosquitto_sub has it when its M-th message
            arrives; runnel when the result that completes the count of N
            arrives upstream, so runnel's time also covers closing its last
            windows and publishing the results (milliseconds). ratio = runnel /
            mosquitto_sub (target >= 0.9). The publisher's own rate is shown:
            when both consumers match it, the publisher or broker was the limit.
  latency   of every window result: its arrival upstream minus the moment the
            window closed (target p99 <= 5 ms). The script replays runnel's
            documented rule (README "Semantics" and "Time") over the readings
            and their publish times, see predict_closes: per device, watermark
            = largest ts - 1 s, advancing with time while no larger ts comes; a
            window closes when the watermark reaches its end; a device with no
            open window is forgotten. A close caused by a reading is measured
            from that reading's PUBLISH, a close by elapsed time from the
            predicted instant. The replay must also give the same window
            results and counts as runnel (checked; a failure at QoS 1).
  CPU, RSS  of the runnel process: utime+stime from /proc/PID/stat between the
            first PUBLISH and the moment the count reached N (polled every
            20 ms), as seconds and as % of one core over that wall time; VmHWM
            (peak RSS of its life, start-up included) and VmRSS at the end. The
            notes add RSS before, a 10 Hz VmRSS peak during the ingest, and the
            CPU of the broker and of mosquitto_sub for comparison.

Clocks: arrivals are stamped by mosquitto_sub itself (`-F %U`: wall clock, ns)
for both consumers: runnel's results are read by a second mosquitto_sub on
`bench-up/#`, `bench-late/#` and `runnel/bench/stats`, so no Python thread or
GIL sits between a message and its stamp. The publisher stamps time.time() just
before the sendall() that writes each batch. runnel's own stats
(`flows.mqtt_bench.in`, every status_interval = 1 s) give a second, coarse
runnel rate (1 s resolution; in the notes).

The workload (realistic width, disorder, late data and key counts)
------------------------------------------------------------------
- K devices with MAC-like ids (`a4c138` + 6 hex digits) publishing to
  `bench/<id>/reading`, every 0.5 s (10 % of them), 1 s (40 %), 2 s (30 %)
  or 5 s (20 %) of event time, each with a random phase: ~0.79 readings per
  device per event second; at K = 500, N = 200,000: ~500 s of event time, ~51
  windows per device, ~25,000 windows.
- Readings go out in order of their nominal time; each `ts` has +-300 ms of
  jitter, so a 0.5 s device's readings swap order and devices interleave.
  0.5 % of readings (never a device's first five) are stamped 15-40 s in the
  past: late data, runnel's `late` output.
- Each reading is a ~180-byte JSON object with 10 fields, e.g.
    {"ts": 1717200012.345, "seq": 7, "temp": 21.37, "rh": 45.2, "battery": 3.912,
     "rssi": -67, "fw": "2.4.1", "status": "ok", "loc": {"lat": 52.52012,
     "lon": 13.40491}, "errs": []}
  `rh` is null in 2 % (left out of its mean), `errs` sometimes lists codes.
- After the N readings, one closing reading per device 60 s of event time
  ahead, without temp/rh: runnel does not flush windows on SIGTERM, so these
  close each device's last windows (K more messages; both consumers get them;
  their own windows are left out).
- Event time advances with the publish sequence, not the wall clock: at
  --rate R it runs R / (0.79 K) times faster than real time (25x at 10,000/s),
  like a gateway working off a backlog, and the data stay the same at any pace.
  Windows then close on data. `--rate realtime` paces at 0.79 K msg/s, so event
  time runs at wall-clock speed and most windows close by elapsed time, as on a
  live gateway (N = 200,000 then takes ~8 minutes).
- Either way each device's window closes at about the same event time, so ~K
  results fall due within ~100 ms at every window boundary (the notes give the
  largest such burst): that burst is what the latency figure measures.

Broker, publisher, runnel
-------------------------
mosquitto (/usr/sbin/mosquitto) on a free 127.0.0.1 port (never 1883), its own
config in the work dir: `max_inflight_messages 100` (default 20: up to 100
unacknowledged QoS 1 messages towards each subscriber, runnel included),
`set_tcp_nodelay true` (with Nagle's algorithm on, as by default, mosquitto
holds a small QoS 0 message back until its previous one is acknowledged, and
delayed ACKs make that up to 40 ms: a broker's latency, not runnel's),
`max_queued_messages 1000000` and `max_queued_bytes 0` (mosquitto's default of
1000 queued messages drops QoS 1 messages for a subscriber that falls behind:
that would show up as runnel "loss"), no persistence, and `log_type subscribe`
(to stdout, line-buffered with stdbuf: started as root, mosquitto drops to its
own user and cannot open a log file in the work dir), so the script waits until
all three subscriptions exist before the first PUBLISH.

The publisher (RawPublisher, the default) is this script's own MQTT 3.1.1
client on a plain socket: packets are encoded beforehand and written in
batches of up to 64 per sendall(), paced by a token bucket (--rate) or unpaced
(--rate max), with at most --window (1000) QoS 1 messages not yet PUBACKed and
every PUBACK matched to a packet id in flight; at QoS 1 it waits for all of
them at the end. paho-mqtt costs 60-100 us per publish() and tops out near
10,000 msg/s at QoS 1 on a 2-core machine, which would make `max` measure
paho; `--publisher paho` still runs it (driven from the publishing thread,
no network thread) as a cross-check.

runnel gets a runnel.toml in the work dir: device_id "bench", status_interval
1, [brokers.default] and [brokers.upstream] both on the private broker,
upstream with client_id "bench-up" and `status = false` (the stats go out once,
on default). The script waits for runnel's log line `connected to broker
default` and its subscription in the broker's log.

How to run
----------
    # a Python with paho-mqtt 2.x (the test venv has it), from the repo root:
    .venv-test/bin/python tests/bench/mqtt_bench.py                 # QoS 0,1 x pace 10000,max
    .venv-test/bin/python tests/bench/mqtt_bench.py --n 20000 --qos 1 --rate 5000
    .venv-test/bin/python tests/bench/mqtt_bench.py --n 20000 --rate realtime   # live latency
    .venv-test/bin/python tests/bench/mqtt_bench.py --markdown --repeat 3

Options: --runnel (default <repo>/target/release/runnel), --n, --keys, --qos
(list), --rate (list of messages/s, `max`, `realtime`), --window, --publisher,
--repeat (keep the run with the best runnel rate per QoS and pace),
--markdown, --workdir (kept), --keep, --timeout, --seed. A kept work dir has
per run: the configs, runnel.log, mosquitto.log, both mosquitto_sub outputs,
published.csv (every message's device, ts and PUBLISH time) and latency.csv
(every window: what closed it, when, when its result arrived). Needs
mosquitto and mosquitto_sub (Debian: mosquitto, mosquitto-clients), stdbuf
(coreutils) and paho-mqtt 2.x (only imported for --publisher paho, but
checked up front so both publishers stay available).

Known limits
------------
- One machine: the publisher, the broker, runnel and two mosquitto_subs share
  its cores (2 on the CI kind), so at `max` the broker's fan-out is usually
  the limit and both consumers just keep up with it; the ratio there says
  "runnel keeps up", not how far it could go.
- runnel's end of stream is the arrival of its last needed result, after the
  closing readings' burst of ~K results (~50-100 ms here): in a run of a
  fraction of a second (small --n at `max`) that tail dominates and the ratio
  drops (0.7-0.9 at --n 5000); use --n >= 100,000 for the ratio.
- runnel's results travel through the same broker once more than mosquitto_sub's
  messages; both latency and runnel's rate include that hop.
- Closes by elapsed time are predicted from publish times; runnel uses its
  receive times, so a few results can come out a little negative or a little
  late (the notes count negatives).
- The end-of-ingest CPU/RSS sample is up to ~20 ms late; VmHWM includes
  start-up (loading Python and the flow).

Exit status: 0 when every check passed (targets are reported, not enforced),
1 when a check failed (loss or a wrong total at QoS 1, results that differ from
the rule replay, a refused PUBLISH, runnel exiting badly or dropping outbox
entries), 2 on bad arguments or a missing tool.
"""

import argparse
import bisect
import heapq
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FLOW_FILE = HERE / "mqtt_flow.py"
FLOW_ID = "mqtt_bench"  # Dataflow id in mqtt_flow.py
DEVICE_ID = "bench"
MOSQUITTO = "/usr/sbin/mosquitto"

# The job. Keep in sync with mqtt_flow.py.
WINDOW_US = 10_000_000
WAIT_US = 1_000_000
ALIGN_US = 1_704_067_200 * 1_000_000  # 2024-01-01T00:00:00Z

# The data.
T0_S = 1_717_200_000  # 2024-06-01: event time starts here
PERIODS = ((0.5, 0.10), (1.0, 0.40), (2.0, 0.30), (5.0, 0.20))  # (s, share of devices)
JITTER_MS = 300
LATE_FRACTION = 0.005
LATE_RANGE_S = (15.0, 40.0)
CLOSER_AHEAD_S = 60
RH_NULL = 0.02
SEED = 7

IDLE_TIMEOUT_S = 30.0  # no progress for this long: stop waiting


# ----------------------------------------------------------------- data ----

class Workload:
    """N readings plus one closing reading per device, in publish order."""

    def __init__(self, n, keys, seed):
        rng = random.Random(seed)
        self.n, self.keys = n, keys
        names = set()
        while len(names) < keys:
            names.add("a4c138" + f"{rng.getrandbits(24):06x}")
        self.devices = sorted(names)
        cum, periods = 0.0, []
        bounds = []
        for p, share in PERIODS:
            cum += share
            bounds.append((cum, p))
        for _ in range(keys):
            u = rng.random()
            periods.append(next((p for c, p in bounds if u < c), PERIODS[-1][0]))
        self.periods = periods
        self.per_event_s = sum(1.0 / p for p in periods)  # readings per second of event time

        fws = ("2.4.1", "2.4.3", "2.5.0-rc1")
        dev = []
        for d in range(keys):
            dev.append({
                "phase": rng.random() * periods[d],
                "k": 0,
                "base": 18.0 + 8.0 * rng.random(),
                "rh": 35.0 + 25.0 * rng.random(),
                "batt": 3.6 + 0.6 * rng.random(),
                "fw": fws[rng.randrange(len(fws))],
                "lat": 52.3 + 0.4 * rng.random(),
                "lon": 13.1 + 0.6 * rng.random(),
                "rssi": rng.randint(-88, -45),
            })
        heap = [(T0_S + dev[d]["phase"], d) for d in range(keys)]
        heapq.heapify(heap)

        self.topics, self.payloads = [], []
        self.dev_idx, self.ts_us, self.is_late, self.has_temp = [], [], [], []
        last_nominal = [None] * keys
        for _ in range(n):
            nominal, d = heapq.heappop(heap)
            s = dev[d]
            k = s["k"]
            s["k"] += 1
            heapq.heappush(heap, (T0_S + s["phase"] + s["k"] * periods[d], d))
            last_nominal[d] = nominal
            late = k >= 5 and rng.random() < LATE_FRACTION
            if late:
                ts_ms = round((nominal - rng.uniform(*LATE_RANGE_S)) * 1000)
            else:
                ts_ms = round(nominal * 1000) + rng.randint(-JITTER_MS, JITTER_MS)
            temp = s["base"] + 2.5 * math.sin(nominal / 600.0 + d) + rng.gauss(0.0, 0.2)
            rh = "null" if rng.random() < RH_NULL else f"{s['rh'] + rng.gauss(0.0, 1.5):.1f}"
            s["batt"] -= 0.00002
            status = "low_batt" if s["batt"] < 3.7 else ("recal" if rng.random() < 0.001 else "ok")
            errs = "[]" if rng.random() < 0.97 else json.dumps(sorted(rng.sample(range(1, 40), rng.randint(1, 3))))
            payload = (
                f'{{"ts": {ts_ms // 1000}.{ts_ms % 1000:03d}, "seq": {k}, "temp": {temp:.2f}, '
                f'"rh": {rh}, "battery": {s["batt"]:.3f}, "rssi": {s["rssi"] + rng.randint(-4, 4)}, '
                f'"fw": "{s["fw"]}", "status": "{status}", '
                f'"loc": {{"lat": {s["lat"]:.5f}, "lon": {s["lon"]:.5f}}}, "errs": {errs}}}'
            )
            self.topics.append(f"bench/{self.devices[d]}/reading")
            self.payloads.append(payload.encode())
            self.dev_idx.append(d)
            self.ts_us.append(ts_ms * 1000)
            self.is_late.append(late)
            self.has_temp.append(True)
        # Closing readings: far ahead, no temp/rh; they close each device's last windows.
        self.closer_window = {}
        for d in range(keys):
            nominal = (last_nominal[d] if last_nominal[d] is not None else T0_S) + CLOSER_AHEAD_S
            ts_ms = round(nominal * 1000)
            payload = f'{{"ts": {ts_ms // 1000}.{ts_ms % 1000:03d}, "seq": {dev[d]["k"]}, "final": true}}'
            self.topics.append(f"bench/{self.devices[d]}/reading")
            self.payloads.append(payload.encode())
            self.dev_idx.append(d)
            self.ts_us.append(ts_ms * 1000)
            self.is_late.append(False)
            self.has_temp.append(False)
            self.closer_window[self.devices[d]] = window_of(ts_ms * 1000)
        self.m = len(self.payloads)
        self.n_late = sum(self.is_late)
        self.event_span_s = (max(self.ts_us[:n]) - min(self.ts_us[:n])) / 1e6 if n else 0.0
        self.mean_bytes = sum(len(p) for p in self.payloads[:n]) / max(n, 1)
        # Reference: per (device, window) the number of temps in it.
        self.expected = Counter()
        for i in range(n):
            if not self.is_late[i]:
                self.expected[(self.devices[self.dev_idx[i]], window_of(self.ts_us[i]))] += 1


def window_of(ts_us):
    return (ts_us - ALIGN_US) // WINDOW_US


def window_end(wid):
    return ALIGN_US + (wid + 1) * WINDOW_US


def predict_closes(wl, pub_wall):
    """Replay runnel's documented window rule over the readings and their
    publish times (README "Semantics" and "Time", live mode).

    Per device: watermark = base + time idle since base last moved, base =
    largest ts - wait; a reading below the watermark is late; a window closes
    when the watermark reaches its end, at the reading that moved it there
    ("data") or at the instant idle time did ("idle"); a device whose windows
    have all closed is forgotten, so its next reading starts a fresh clock (and
    can re-open a window that already closed).

    Returns ({(device, window): [(close wall time, "data"|"idle", count), ...]}
    in close order, [indices of the readings that are late])."""
    closes, late = {}, []
    state = {}  # d -> [base_us, moved_at_wall, {open window id: count}]
    for i in range(wl.m):
        d, ts, t = wl.dev_idx[i], wl.ts_us[i], pub_wall[i]
        st = state.get(d)
        name = wl.devices[d]
        wm = None
        if st is not None:
            base, moved, open_ids = st
            wm = base + int((t - moved) * 1e6)
            for wid in sorted(open_ids):
                end = window_end(wid)
                if end <= wm:  # closed by idle time before this reading
                    closes.setdefault((name, wid), []).append((moved + (end - base) / 1e6, "idle", open_ids.pop(wid)))
            if not open_ids:  # forgotten at its last close
                st = None
                wm = None
        if st is None:
            st = state[d] = [None, t, {}]
        if wm is not None and ts < wm:
            late.append(i)
            continue
        cand = ts - WAIT_US
        if wm is None or cand > wm:
            st[0], st[1], wm = cand, t, cand
        open_ids = st[2]
        wid = window_of(ts)
        open_ids[wid] = open_ids.get(wid, 0) + (1 if wl.has_temp[i] else 0)
        for wid in sorted(open_ids):
            if window_end(wid) <= wm:
                closes.setdefault((name, wid), []).append((t, "data", open_ids.pop(wid)))
    return closes, late


# ------------------------------------------------------------- processes ----

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if port == 1883:
        return free_port()
    return port


def wait_for(pred, timeout, what, procs=()):
    """Poll pred() every 20 ms until true; RuntimeError after timeout or if a
    process in procs has exited."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        for name, p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited (status {p.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def file_text(path):
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def proc_cpu_s(pid):
    """utime + stime of pid in seconds, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rpartition(")")[2].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_mem_kib(pid):
    """{"VmRSS": kib, "VmHWM": kib} of pid ({} if gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            rss = proc_mem_kib(self.pid).get("VmRSS", 0)
            self.peak_kib = max(self.peak_kib, rss)
            self.stop.wait(self.interval)


class Procs:
    """Child processes of one run; stop() ends them all (each in its own
    session, so Ctrl-C reaches only this script, which stops them in order)."""

    def __init__(self):
        self.items = []  # (name, Popen, log file handle)

    def start(self, name, argv, stdout, stderr=None, env=None, cwd=None):
        out = open(stdout, "wb")
        err = open(stderr, "wb") if stderr else subprocess.STDOUT
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             env=env, cwd=cwd, start_new_session=True)
        self.items.append((name, p, out, err))
        return p

    def stop_one(self, p, sig=signal.SIGTERM, grace=10.0):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def stop(self):
        for name, p, out, err in reversed(self.items):  # consumers first, broker last
            try:
                self.stop_one(p, grace=5.0)
            except Exception:  # never leave one behind
                try:
                    p.kill()
                except OSError:
                    pass
            for h in (out, err):
                if hasattr(h, "close"):
                    h.close()
        self.items = []


# ------------------------------------------------------------- consumers ----

class ResultReader:
    """Reads the results mosquitto_sub's lines (`%U topic payload`) as they
    grow: window results, late readings and runnel's stats."""

    def __init__(self, path, n, m):
        self.path, self.n, self.m = path, n, m
        self.pos = 0
        self.buf = b""
        self.seen = set()
        self.dups = 0
        self.total = 0
        self.t_complete = None  # arrival of the result that completed N
        self.windows = {}  # (device, wid) -> [(arrival, temp count), ...] in arrival order
        self.late = 0
        self.late_ids = Counter()
        self.stats = []  # (arrival, stats dict)
        self.t_stats_complete = None
        self.bad = 0
        self.last_arrival = None

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return False
        if not chunk:
            return False
        self.pos += len(chunk)
        data = self.buf + chunk
        lines = data.split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            if line:
                self._line(line.decode(errors="replace"))
        return True

    def _line(self, line):
        try:
            t_s, topic, payload = line.split(" ", 2)
            t = float(t_s)
            if topic == f"runnel/{DEVICE_ID}/stats":
                s = json.loads(payload)
                self.stats.append((t, s))
                if self.t_stats_complete is None and s["flows"][FLOW_ID]["in"] >= self.m:
                    self.t_stats_complete = t
                return
            msg = json.loads(payload)
            key = (msg["step"], msg["seq"])
            if key in self.seen:
                self.dups += 1
                return
            self.seen.add(key)
            self.last_arrival = t
            if msg["step"] == "up":
                wkey = (msg["key"], msg["window"])
                count = msg["value"]["temp"]["count"]
                self.windows.setdefault(wkey, []).append((t, count))
                self.total += count
            elif msg["step"] == "late":
                self.late += 1
                self.late_ids[msg["id"]] += 1
                self.total += 1
            else:
                self.bad += 1
                return
            if self.t_complete is None and self.total >= self.n:
                self.t_complete = t
        except (ValueError, KeyError, TypeError):
            self.bad += 1


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def last_stamp(path):
    """The %U stamp of the last complete line of a mosquitto_sub -F %U file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().splitlines()
        return float(lines[-1]) if lines else None
    except (FileNotFoundError, ValueError):
        return None


# ------------------------------------------------------------- publisher ----

def mqtt_varint(n):
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(text):
    b = text.encode()
    return len(b).to_bytes(2, "big") + b


class RawPublisher:
    """A minimal MQTT 3.1.1 publisher on a plain socket (the default).

    PUBLISH packets are encoded before the run and written in batches of up
    to BATCH with one sendall, so Python costs ~1 us per message and the
    publisher is not what limits `--rate max` (paho-mqtt costs ~60-100 us per
    message, see --publisher paho). Packet ids cycle 1..65535; at most `window`
    messages are un-PUBACKed (QoS 1), and every PUBACK must match one. The
    send buffer is kept small (SO_SNDBUF 64 KiB) so that at QoS 0 a message's
    stamp is not much earlier than the broker reading it. keepalive 0: no
    PINGREQ needed however long a paced run takes."""

    BATCH = 64

    def __init__(self, port, qos, window):
        self.qos, self.window = qos, min(window, 65535)
        self.refused = []
        self.acked = 0
        self.outstanding = set()
        self.buf = b""
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        body = mqtt_str("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + mqtt_str("bench-pub")
        s.sendall(b"\x10" + mqtt_varint(len(body)) + body)
        ack = b""
        while len(ack) < 4:
            chunk = s.recv(4 - len(ack))
            if not chunk:
                raise RuntimeError("publisher: the broker closed the connection before CONNACK")
            ack += chunk
        if ack[0] != 0x20 or ack[3] != 0:
            raise RuntimeError(f"publisher: CONNACK refused ({ack.hex()})")
        s.settimeout(None)
        self.sock = s

    def encode(self, topics, payloads):
        head = bytes([0x30 | (self.qos << 1)])
        out = []
        for i, (t, p) in enumerate(zip(topics, payloads)):
            vh = mqtt_str(t) + (((i % 65535) + 1).to_bytes(2, "big") if self.qos else b"")
            out.append(head + mqtt_varint(len(vh) + len(p)) + vh + p)
        return out

    def _read_acks(self, timeout):
        """Read what the broker sent (PUBACKs only) within timeout (0: poll)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("publisher: the broker closed the connection")
        data = self.buf + chunk
        pos = 0
        while len(data) - pos >= 4:
            if data[pos] != 0x40 or data[pos + 1] != 2:
                raise RuntimeError(f"publisher: unexpected packet from the broker: {data[pos:pos + 8].hex()}")
            pid = int.from_bytes(data[pos + 2:pos + 4], "big")
            if pid in self.outstanding:
                self.outstanding.discard(pid)
                self.acked += 1
            else:
                self.refused.append((pid, "PUBACK for a packet id not in flight"))
            pos += 4
        self.buf = data[pos:]

    def prepare(self, topics, payloads):
        self.packets = self.encode(topics, payloads)

    def run(self, rate, timeout):
        packets = self.packets
        m = len(packets)
        stamps = [0.0] * m
        qos, window, batch = self.qos, self.window, self.BATCH
        sock, outstanding = self.sock, self.outstanding
        start = time.perf_counter()
        deadline = start + timeout
        i = 0
        while i < m:
            room = window - (i - self.acked) if qos else batch
            if rate is not None:
                due = int((time.perf_counter() - start) * rate) + 1
                k = min(due - i, room, batch, m - i)
            else:
                k = min(room, batch, m - i)
            if k <= 0:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"publisher: timed out ({i - self.acked} outstanding)")
                wait = 0.01 if room <= 0 or rate is None else max(0.0, start + i / rate - time.perf_counter())
                if qos:
                    self._read_acks(wait)
                else:
                    time.sleep(wait)
                continue
            t = time.time()
            for j in range(i, i + k):
                stamps[j] = t
                if qos:
                    outstanding.add((j % 65535) + 1)
            sock.sendall(b"".join(packets[i:i + k]))
            i += k
            if qos:
                self._read_acks(0)
        self.t_last = stamps[-1]
        if qos:
            end = time.perf_counter() + 60
            while self.acked < m:
                if time.perf_counter() > end:
                    raise RuntimeError(f"publisher: {m - self.acked} PUBACKs missing after 60 s")
                self._read_acks(0.05)
        return stamps

    def close(self):
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.close()
        except OSError:
            pass


class Publisher:
    """paho-mqtt 2.x client driven from the calling thread (no loop_start):
    publish() writes to the socket right away, loop() reads PUBACKs."""

    def __init__(self, mqtt, port, qos, window):
        self.qos, self.window = qos, window
        self.done = 0
        self.refused = []
        self.disconnected = None
        self.connected = False
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub",
                        protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(window)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        self.c, self.mqtt = c, mqtt
        c.connect("127.0.0.1", port, keepalive=60)
        deadline = time.monotonic() + 10
        while not self.connected:
            if self.disconnected is not None or time.monotonic() > deadline:
                raise RuntimeError(f"publisher could not connect ({self.disconnected})")
            c.loop(timeout=0.05)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.disconnected = f"CONNACK {reason_code}"
        else:
            self.connected = True

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.done += 1
        if reason_code.is_failure:
            self.refused.append((mid, str(reason_code)))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected = str(reason_code)

    def _loop(self, timeout):
        rc = self.c.loop(timeout=timeout)
        if rc != self.mqtt.MQTT_ERR_SUCCESS or self.disconnected is not None:
            raise RuntimeError(f"publisher lost the broker: {self.disconnected or self.mqtt.error_string(rc)}")

    def prepare(self, topics, payloads):
        self.topics, self.payloads = topics, payloads

    def run(self, rate, timeout):
        """Publish everything; return the list of time.time() stamps taken
        right before each PUBLISH."""
        topics, payloads = self.topics, self.payloads
        stamps = [0.0] * len(payloads)
        pub = self.c.publish
        qos, window = self.qos, self.window
        ok = self.mqtt.MQTT_ERR_SUCCESS
        start = time.perf_counter()
        deadline = start + timeout
        for i in range(len(payloads)):
            if rate is not None:
                due = start + i / rate
                while True:
                    now = time.perf_counter()
                    if now >= due:
                        break
                    self._loop(min(due - now, 0.05))
            while i - self.done >= window:  # bounded outstanding messages
                self._loop(0.01)
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"publisher: no progress (outstanding {i - self.done})")
            stamps[i] = time.time()
            info = pub(topics[i], payloads[i], qos)
            if info.rc != ok:
                self.refused.append((i, self.mqtt.error_string(info.rc)))
            if i & 63 == 63:
                self._loop(0)
        self.t_last = stamps[-1]
        # QoS 1: every PUBACK; QoS 0: everything written to the socket.
        deadline = time.perf_counter() + 60
        while self.done < len(payloads):
            self._loop(0.01)
            if time.perf_counter() > deadline:
                raise RuntimeError(f"publisher: {len(payloads) - self.done} messages never completed")
        return stamps

    def close(self):
        try:
            self.c.disconnect()
            self.c.loop(timeout=0.1)
        except Exception:
            pass


# ----------------------------------------------------------------- run ----

class RunResult:
    pass


def run_once(args, wl, qos, pace, workdir, mqtt):
    """One run: broker, consumers, publisher. pace = (label, messages/s or
    None for max). Returns a RunResult."""
    r = RunResult()
    r.qos, (r.pace, rate) = qos, pace
    r.rate = rate
    r.problems = []
    r.notes = []
    workdir.mkdir(parents=True, exist_ok=True)
    flows = workdir / "flows"
    flows.mkdir(exist_ok=True)
    shutil.copy(FLOW_FILE, flows / "mqtt_flow.py")
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    (workdir / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_inflight_messages 100\n"
        "max_queued_messages 1000000\n"
        "max_queued_bytes 0\n"
        "set_tcp_nodelay true\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nlog_type subscribe\n"
        "log_timestamp_format %s\n")
    (workdir / "runnel.toml").write_text(
        f'device_id = "{DEVICE_ID}"\n'
        'flows_dir = "flows"\n'
        'state_dir = "state"\n'
        "status_interval = 1\n"
        + "".join(f"{kv}\n" for kv in args.runnel_config) +
        "\n[brokers.default]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        "\n[brokers.upstream]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        'client_id = "bench-up"\n'
        "status = false\n")
    broker_log = workdir / "mosquitto.log"
    base_out, res_out = workdir / "mosquitto_sub.out", workdir / "results.out"
    runnel_log = workdir / "runnel.log"
    for p in (base_out, res_out):
        p.unlink(missing_ok=True)
    procs = Procs()
    pub = None
    sampler = None
    try:
        broker = procs.start("mosquitto", ["stdbuf", "-oL", MOSQUITTO, "-c", str(workdir / "mosquitto.conf")], broker_log)
        wait_for(lambda: "running" in file_text(broker_log), 10, "mosquitto to start",
                 [("mosquitto", broker)])
        r.broker_pid = broker.pid
        sub_base = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "bench-sub",
                    "-q", str(qos), "-t", "bench/+/reading", "-F", "%U", "-C", str(wl.m)]
        base = procs.start("mosquitto_sub", sub_base, base_out, workdir / "mosquitto_sub.err")
        res = procs.start("results-sub", ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port),
                                          "-i", "bench-results", "-q", "1", "-t", "bench-up/#",
                                          "-t", "bench-late/#", "-t", f"runnel/{DEVICE_ID}/stats",
                                          "-F", "%U %t %p"], res_out, workdir / "results.err")
        env = dict(os.environ, RUNNEL_BENCH_QOS=str(qos))
        env.pop("RUNNEL_LOG", None)
        runnel = procs.start("runnel", [args.runnel, "run", "--config", str(workdir / "runnel.toml")],
                             workdir / "runnel.stdout", runnel_log, env=env, cwd=workdir)
        r.runnel_pid = runnel.pid
        live = [("mosquitto", broker), ("mosquitto_sub", base), ("results mosquitto_sub", res), ("runnel", runnel)]
        wait_for(lambda: "connected to broker default" in file_text(runnel_log), 20,
                 "runnel's log line `connected to broker default`", live)
        subs = (f"bench-sub {qos} bench/+/reading", "bench-results 1 bench-up/#",
                f"runnel-{DEVICE_ID}-default {qos} bench/+/reading")
        wait_for(lambda: all(s in file_text(broker_log) for s in subs), 20,
                 "all three subscriptions in mosquitto's log (" + "; ".join(subs) + ")", live)

        if args.publisher == "paho":
            pub = Publisher(mqtt, port, qos, args.window)
        else:
            pub = RawPublisher(port, qos, args.window)
        pub.prepare(wl.topics, wl.payloads)
        sampler = RssSampler(runnel.pid)
        cpu0, bcpu0, scpu0 = proc_cpu_s(runnel.pid), proc_cpu_s(broker.pid), proc_cpu_s(base.pid)
        r.rss0_kib = proc_mem_kib(runnel.pid).get("VmRSS", 0)
        sampler.start()
        stamps = pub.run(rate, args.timeout)
        r.t_first, r.t_last_pub = stamps[0], pub.t_last
        r.refused = list(pub.refused)
        if r.refused:
            r.problems.append(f"{len(r.refused)} PUBLISH refused, e.g. {r.refused[:3]}")

        # Wait for runnel to account for all N readings.
        reader = ResultReader(res_out, wl.n, wl.m)
        deadline = time.monotonic() + args.timeout
        last_progress = time.monotonic()
        cpu1 = bcpu1 = None
        while True:
            if reader.poll():
                last_progress = time.monotonic()
            if reader.t_complete is not None:
                cpu1, bcpu1 = proc_cpu_s(runnel.pid), proc_cpu_s(broker.pid)
                r.t_detect = time.time()
                break
            if runnel.poll() is not None:
                r.problems.append(f"runnel exited (status {runnel.returncode}) during the run")
                break
            now = time.monotonic()
            if now - last_progress > IDLE_TIMEOUT_S or now > deadline:
                r.notes.append(f"runnel accounted for {reader.total:,} of {wl.n:,} readings; "
                               f"stopped waiting after {IDLE_TIMEOUT_S:g} s without a result")
                break
            time.sleep(0.02)
        mem = proc_mem_kib(runnel.pid)
        if cpu1 is None:
            cpu1, bcpu1, r.t_detect = proc_cpu_s(runnel.pid), proc_cpu_s(broker.pid), time.time()
        sampler.stop.set()
        r.rss_end_kib, r.hwm_kib = mem.get("VmRSS", 0), mem.get("VmHWM", 0)
        r.rss_peak_ingest_kib = max(sampler.peak_kib, r.rss_end_kib)
        r.cpu_s = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else float("nan")
        r.broker_cpu_s = (bcpu1 - bcpu0) if bcpu0 is not None and bcpu1 is not None else float("nan")
        r.ingest_wall = r.t_detect - r.t_first

        # mosquitto_sub exits after M messages (-C); at QoS 0 it may never get them all.
        # Reaped with os.wait4 for its CPU time (rusage).
        scpu1 = None
        t_wait = time.monotonic() + max(5.0, IDLE_TIMEOUT_S if reader.t_complete is None else 15.0)
        while time.monotonic() < t_wait:
            pid, status, ru = os.wait4(base.pid, os.WNOHANG)
            if pid == base.pid:
                base.returncode = os.waitstatus_to_exitcode(status)
                scpu1 = ru.ru_utime + ru.ru_stime
                break
            time.sleep(0.05)
        else:
            scpu1 = proc_cpu_s(base.pid)
        r.sub_cpu_s = (scpu1 - scpu0) if scpu0 is not None and scpu1 is not None else float("nan")
        r.sub_received = count_lines(base_out)
        r.t_sub_done = last_stamp(base_out) if r.sub_received else None
        # One more stats message after completion (status_interval = 1 s).
        t_wait = time.monotonic() + 2.5
        while time.monotonic() < t_wait:
            reader.poll()
            time.sleep(0.05)
        code = procs.stop_one(runnel, signal.SIGTERM, grace=10.0)
        reader.poll()
        r.runnel_exit = code
        if code != 0:
            r.problems.append(f"runnel exited with status {code} on SIGTERM")
        log = file_text(runnel_log)
        stopped = [l for l in log.splitlines() if f"flow {FLOW_ID} stopped:" in l]
        r.counters = stopped[-1].split("stopped:", 1)[1].strip() if stopped else "(no summary line)"
        r.log_warnings = [l for l in log.splitlines() if " WARN " in l or " ERROR " in l]
        r.reader = reader
    finally:
        if sampler is not None:
            sampler.stop.set()
        if pub is not None:
            pub.close()
        procs.stop()

    # ---------------------------------------------------------- figures ----
    r.published = wl.m
    r.pub_rate = (wl.m - 1) / (r.t_last_pub - r.t_first) if r.t_last_pub > r.t_first else float("nan")
    r.received = reader.total
    r.loss = wl.n - reader.total
    r.dups = reader.dups
    r.late = reader.late
    r.runnel_rate = wl.m / (reader.t_complete - r.t_first) if reader.t_complete else None
    r.sub_rate = wl.m / (r.t_sub_done - r.t_first) if r.sub_received >= wl.m and r.t_sub_done else None
    r.stats_rate = wl.m / (reader.t_stats_complete - r.t_first) if reader.t_stats_complete else None
    if r.runnel_rate and r.sub_rate:
        r.ratio = r.runnel_rate / r.sub_rate
    else:
        r.ratio = None
    if reader.stats:
        last = reader.stats[-1][1]
        f = last.get("flows", {}).get(FLOW_ID, {})
        r.stats_in, r.stats_decode_errors = f.get("in"), f.get("decode_errors")
        r.outbox_dropped = sum(b.get("outbox_dropped", 0) for b in last.get("brokers", {}).values())
    else:
        r.stats_in = r.stats_decode_errors = r.outbox_dropped = None

    with open(workdir / "published.csv", "w") as f:  # every message: device, ts, PUBLISH time
        f.write("i,device,ts_us,late,publish_s\n")
        for i in range(wl.m):
            f.write(f"{i},{wl.devices[wl.dev_idx[i]]},{wl.ts_us[i]},{int(wl.is_late[i])},{stamps[i] - r.t_first:.6f}\n")

    # Latency and per-window reference check (against the rule replay).
    closes, late_idx = predict_closes(wl, stamps)
    r.predicted_late = len(late_idx)
    r.designated_not_late = wl.n_late - sum(1 for i in late_idx if wl.is_late[i])
    lat, kinds = [], Counter()
    mismatches = missing = unexpected = 0
    csv = ["device,window,closed_by,close_s,arrival_s,latency_ms"]  # times from the first PUBLISH
    for wkey, got in reader.windows.items():
        if wl.closer_window.get(wkey[0]) == wkey[1]:
            continue
        want = closes.get(wkey, [])
        for k, (arrival, count) in enumerate(got):
            if k >= len(want):
                unexpected += 1
                continue
            c_t, kind, c_count = want[k]
            if count != c_count:
                mismatches += 1
            lat.append((arrival - c_t) * 1000.0)
            kinds[kind] += 1
            csv.append(f"{wkey[0]},{wkey[1]},{kind},{c_t - r.t_first:.6f},{arrival - r.t_first:.6f},{lat[-1]:.3f}")
    for wkey, want in closes.items():
        missing += max(0, len(want) - len(reader.windows.get(wkey, [])))
    r.reopened = sum(len(v) - 1 for v in closes.values() if len(v) > 1)
    r.windows_expected = sum(len(v) for v in closes.values())
    r.windows_got = sum(len(v) for k, v in reader.windows.items() if wl.closer_window.get(k[0]) != k[1])
    (workdir / "latency.csv").write_text("\n".join(csv) + "\n")
    close_times = sorted(c[0] for v in closes.values() for c in v)
    r.burst = max((bisect.bisect_right(close_times, t + 0.1) - i for i, t in enumerate(close_times)), default=0)
    r.speedup = (r.pub_rate / wl.per_event_s) if r.pub_rate == r.pub_rate else float("nan")
    lat.sort()
    r.lat_n, r.lat_kinds = len(lat), kinds
    r.lat = {p: nearest_rank(lat, p) for p in (0.5, 0.99, 1.0)} if lat else None
    r.lat_negative = bisect.bisect_left(lat, 0.0)
    r.mismatches, r.missing, r.unexpected = mismatches, missing, unexpected
    r.late_id_collisions = sum(c - 1 for c in reader.late_ids.values() if c > 1)

    # ----------------------------------------------------------- checks ----
    if reader.bad:
        r.problems.append(f"{reader.bad} unreadable or unexpected result messages")
    if r.loss < 0:
        r.problems.append(f"runnel accounted for {reader.total:,} readings, more than the {wl.n:,} published")
    if qos == 1:
        if r.loss > 0:
            r.problems.append(f"QoS 1 loss: {r.loss:,} of {wl.n:,} readings unaccounted for")
        if r.sub_received != wl.m:
            r.problems.append(f"mosquitto_sub got {r.sub_received:,} of {wl.m:,} messages at QoS 1")
        if mismatches or missing or unexpected:
            r.problems.append(f"windows vs reference: {mismatches} wrong counts, {missing} missing, "
                              f"{unexpected} unexpected")
        if r.late != r.predicted_late:
            r.problems.append(f"{r.late} late readings, the rule says {r.predicted_late}")
        if r.stats_in is not None and r.stats_in != wl.m:
            r.problems.append(f"runnel stats say in = {r.stats_in:,}, expected {wl.m:,}")
    if r.stats_decode_errors:
        r.problems.append(f"runnel stats: {r.stats_decode_errors} decode errors")
    if r.outbox_dropped:
        r.problems.append(f"runnel dropped {r.outbox_dropped} outbox entries")
    return r


def nearest_rank(sorted_values, p):
    if not sorted_values:
        return None
    k = max(1, math.ceil(p * len(sorted_values)))
    return sorted_values[k - 1]


# ---------------------------------------------------------------- table ----

HEADER = ["QoS", "pace msg/s", "published", "runnel received", "loss", "dups",
          "pub msg/s", "runnel msg/s", "mosquitto_sub msg/s", "ratio",
          "lat p50 ms", "lat p99 ms", "lat max ms", "runnel CPU s", "CPU % of core",
          "peak RSS MiB", "end RSS MiB", "check"]


def fmt_rate(x):
    return f"{x:,.0f}" if x else "-"


def row(r):
    lat = r.lat or {}
    f = lambda v: f"{v:.2f}" if v is not None else "-"
    cpu_pct = 100.0 * r.cpu_s / r.ingest_wall if r.ingest_wall > 0 else float("nan")
    return [
        str(r.qos), r.pace, f"{r.published:,}",
        f"{r.received:,}", f"{max(r.loss, 0):,}", f"{r.dups:,}",
        fmt_rate(r.pub_rate), fmt_rate(r.runnel_rate), fmt_rate(r.sub_rate),
        f"{r.ratio:.2f}" if r.ratio else "-",
        f(lat.get(0.5)), f(lat.get(0.99)), f(lat.get(1.0)),
        f"{r.cpu_s:.2f}", f"{cpu_pct:.0f}",
        f"{r.hwm_kib / 1024:.1f}", f"{r.rss_end_kib / 1024:.1f}",
        "; ".join(r.problems) or "ok",
    ]


def print_table(rows, markdown):
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join(["---:"] * (len(HEADER) - 1) + ["---"]) + "|")
        for x in rows:
            print("| " + " | ".join(x) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows)]
    for i, x in enumerate([HEADER] + rows):
        cells = [c.ljust(w) if j == len(HEADER) - 1 else c.rjust(w) for j, (c, w) in enumerate(zip(x, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def notes(r, wl):
    out = [f"QoS {r.qos}, pace {r.pace}:"]
    sr = f"{r.stats_rate:,.0f} msg/s" if r.stats_rate else "-"
    out.append(f"  runnel rate from its stats (in reached {wl.m:,}; 1 s resolution): {sr}; "
               f"ingest {r.ingest_wall:.2f} s wall, runnel CPU {r.cpu_s:.2f} s, broker CPU {r.broker_cpu_s:.2f} s")
    out.append(f"  mosquitto_sub CPU {r.sub_cpu_s:.2f} s; event time ran {r.speedup:.1f}x real time, so up to "
               f"{r.burst:,} windows closed within 100 ms (each device's window closes near the same event time)")
    out.append(f"  runnel RSS: {r.rss0_kib / 1024:.1f} MiB before, {r.rss_peak_ingest_kib / 1024:.1f} MiB peak during "
               f"the ingest (10 Hz samples), {r.rss_end_kib / 1024:.1f} MiB at the end; VmHWM {r.hwm_kib / 1024:.1f} MiB")
    if r.lat:
        out.append(f"  latency over {r.lat_n:,} windows ({r.lat_kinds.get('data', 0):,} closed by a reading, "
                   f"{r.lat_kinds.get('idle', 0):,} by idle time)"
                   + (f"; {r.lat_negative} negative (clock/rule mismatch)" if r.lat_negative else ""))
    out.append(f"  windows: {r.windows_got:,} results, {r.windows_expected:,} by the rule; {r.mismatches} wrong counts, "
               f"{r.missing} missing, {r.unexpected} unexpected; late readings {r.late:,} (the rule: "
               f"{r.predicted_late:,}; {wl.n_late:,} stamped late)")
    if r.reopened:
        out.append(f"  {r.reopened} windows closed twice: a reading stamped late came after its device had been "
                   f"forgotten (all windows closed), so it started a fresh clock, was not late, and re-opened a "
                   f"closed window; the second result has the same `id` as the first")
    if r.late_id_collisions:
        out.append(f"  {r.late_id_collisions} late results share an `id` with an earlier, different late "
                   "result (same device and window): a receiver that dedupes by `id` would drop them")
    out.append(f"  mosquitto_sub: {r.sub_received:,} of {wl.m:,} messages")
    out.append(f"  runnel counters: {r.counters}")
    for l in r.log_warnings[:5]:
        out.append(f"  runnel log: {l}")
    if len(r.log_warnings) > 5:
        out.append(f"  ... {len(r.log_warnings) - 5} more WARN/ERROR lines")
    for n in r.notes:
        out.append(f"  {n}")
    return out


# ----------------------------------------------------------------- main ----

def parse_list(text, conv):
    return [conv(w.strip()) for w in text.split(",") if w.strip()]


def parse_rate(w):
    if w.lower() in ("max", "realtime"):
        return w.lower()
    v = float(w)
    if v <= 0:
        raise ValueError(w)
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for details.")
    ap.add_argument("--runnel", default=str(REPO / "target" / "release" / "runnel"),
                    help="runnel binary (default <repo>/target/release/runnel)")
    ap.add_argument("--n", type=int, default=200_000, help="readings to publish (default 200,000)")
    ap.add_argument("--keys", type=int, default=500, help="devices (default 500)")
    ap.add_argument("--qos", default="0,1", help="comma-separated QoS levels to run (default 0,1)")
    ap.add_argument("--rate", default="10000,max",
                    help="comma-separated publisher paces: messages/s, `max` (unpaced), or `realtime` "
                         "(event time = wall time, ~0.79 msg/s per device) (default 10000,max)")
    ap.add_argument("--window", type=int, default=1000,
                    help="most QoS 1 messages the publisher has un-PUBACKed (default 1000)")
    ap.add_argument("--publisher", choices=("raw", "paho"), default="raw",
                    help="raw: this script's own MQTT 3.1.1 writer, batches of 64 (default); "
                         "paho: paho-mqtt 2.x, one publish() call per message (~10k msg/s at most)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per QoS and pace; the table keeps the one with the best runnel rate")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--workdir", type=Path, default=None, help="work dir (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, outputs)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before giving up")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--runnel-config", action="append", default=[], metavar="KEY=VALUE",
                    help="a top-level line for runnel.toml, e.g. 'commit_gap = 0' (repeatable)")
    args = ap.parse_args()
    try:
        qoss = parse_list(args.qos, int)
        rates = parse_list(args.rate, parse_rate)
    except ValueError as ex:
        ap.error(f"bad --qos or --rate: {ex}")
    if not qoss or any(q not in (0, 1) for q in qoss) or not rates:
        ap.error("--qos takes 0 and/or 1, --rate at least one pace")
    if args.n < 1 or args.keys < 1 or args.repeat < 1 or args.window < 1:
        ap.error("--n, --keys, --repeat and --window must be positive")

    try:
        import paho.mqtt.client as mqtt
        import importlib.metadata as md
        paho_version = md.version("paho-mqtt")
    except ImportError:
        print(f"error: {sys.executable} has no paho-mqtt; run this with a Python that has paho-mqtt 2.x "
              "(e.g. .venv-test/bin/python), or `pip install 'paho-mqtt>=2'`", file=sys.stderr)
        return 2
    if not hasattr(mqtt, "CallbackAPIVersion"):
        print(f"error: paho-mqtt {paho_version} is too old; this needs 2.x", file=sys.stderr)
        return 2
    missing = [t for t in (MOSQUITTO, "mosquitto_sub", "stdbuf") if shutil.which(t) is None]
    if not (os.path.isfile(args.runnel) and os.access(args.runnel, os.X_OK)):
        missing.append(f"{args.runnel} (build it with `cargo build --release` or pass --runnel)")
    if missing:
        print("error: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    args.runnel = os.path.abspath(args.runnel)

    # Ctrl-C and SIGTERM: unwind through the finally blocks that stop the children.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    t = time.monotonic()
    wl = Workload(args.n, args.keys, args.seed)
    gen_s = time.monotonic() - t
    counts = Counter(wl.periods)
    mix = ", ".join(f"{counts[p]} every {p:g} s" for p, _ in PERIODS)
    print(f"workload: {args.n:,} readings + {args.keys} closing readings from {args.keys} devices ({mix}) "
          f"on bench/<device>/reading; {wl.mean_bytes:.0f}-byte JSON, 10 fields incl. nested loc and a list; "
          f"jitter +-{JITTER_MS} ms (reordered within a device), {wl.n_late:,} late by "
          f"{LATE_RANGE_S[0]:g}-{LATE_RANGE_S[1]:g} s ({100.0 * wl.n_late / args.n:.2f} %), "
          f"{RH_NULL * 100:g} % rh null; {wl.event_span_s:,.0f} s of event time, "
          f"{len(wl.expected):,} windows (generated in {gen_s:.1f} s, seed {args.seed})")
    print("job: runnel run tests/bench/mqtt_flow.py: key_on device, EventClock ts (wait 1 s), 10 s tumbling, "
          "aggregate temp count/mean/max + rh mean -> bench-up/<device>, late -> bench-late/<device> "
          "(same broker, QoS 1); baseline: mosquitto_sub on bench/+/reading")
    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; {platform.python_version()}, paho-mqtt {paho_version}; "
          f"{subprocess.run([MOSQUITTO, '-h'], capture_output=True, text=True).stdout.splitlines()[0:1][0]}; "
          f"runnel {args.runnel}")
    paces = []
    for rt in rates:
        if rt == "max":
            paces.append(("max", None))
        elif rt == "realtime":
            paces.append((f"realtime {wl.per_event_s:,.0f}", wl.per_event_s))
        else:
            paces.append((f"{rt:,.0f}", rt))
    slow = [label for label, rt in paces if rt is not None and rt < wl.per_event_s * 0.999]
    if slow:
        print(f"note: at pace {', '.join(slow)} event time runs slower than real time "
              f"({wl.per_event_s:.0f} readings per event second): windows close by elapsed time and "
              "readings can turn late that are not stamped late (the rule replay follows)")
    print(flush=True)

    own_dir = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="runnel-mqtt-bench-")) if own_dir else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    failed = False
    try:
        for rep in range(args.repeat):
            for qos in qoss:
                for pace in paces:
                    tag = f"q{qos}-{pace[0].split()[0].replace(',', '')}-{rep + 1}"
                    print(f"run {rep + 1}/{args.repeat} QoS {qos} pace {pace[0]} ...",
                          end=" ", flush=True, file=sys.stderr)
                    try:
                        r = run_once(args, wl, qos, pace, root / tag, mqtt)
                    except (RuntimeError, OSError) as ex:
                        print(f"FAILED: {ex}", file=sys.stderr)
                        print(f"  logs in {root / tag}", file=sys.stderr)
                        failed = True
                        args.keep = True
                        continue
                    print(f"runnel {fmt_rate(r.runnel_rate)} msg/s, mosquitto_sub {fmt_rate(r.sub_rate)} msg/s, "
                          f"received {r.received:,}/{args.n:,}"
                          + (f", PROBLEMS: {'; '.join(r.problems)}" if r.problems else ""),
                          file=sys.stderr)
                    if r.problems:
                        failed = True
                        args.keep = True
                    key = (qos, pace)
                    best = results.get(key)
                    if best is None or (r.runnel_rate or 0) > (best.runnel_rate or 0) or (r.problems and not best.problems):
                        results[key] = r
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif root.exists():
            print(f"work dir kept: {root}", file=sys.stderr)
    print(file=sys.stderr)

    ordered = [results[(q, pc)] for q in qoss for pc in paces if (q, pc) in results]
    if args.markdown:
        print(f"*{args.n:,} readings from {args.keys} devices via mosquitto on 127.0.0.1; "
              f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; "
              f"best of {args.repeat}.*\n")
    print_table([row(r) for r in ordered], args.markdown)
    print()
    print("rates: messages (readings + closing readings) / (that consumer had them all - first PUBLISH); "
          "latency: result arrival upstream - window close (the PUBLISH of the reading that closed it); "
          "CPU and RSS: the runnel process; peak RSS = VmHWM")
    for r in ordered:
        for line in notes(r, wl):
            print(line)
    targets = []
    for r in ordered:
        name = f"QoS {r.qos} pace {r.pace}"
        ratio_ok = r.ratio is not None and r.ratio >= 0.9
        p99_ok = r.lat is not None and r.lat[0.99] <= 5.0
        targets.append(f"{name}: ratio >= 0.9 {'yes' if ratio_ok else 'NO'}, p99 <= 5 ms {'yes' if p99_ok else 'NO'}"
                       + (f", zero loss {'yes' if r.loss == 0 else 'NO'}" if r.qos == 1 else ""))
    print("targets: " + "; ".join(targets))
    if failed:
        bad = [f"QoS {r.qos} pace {r.pace}: {'; '.join(r.problems)}"
               for r in ordered if r.problems]
        print("\nFAILED: " + ("; ".join(bad) if bad else "a run could not complete (see above)"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
