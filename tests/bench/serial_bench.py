#!/usr/bin/env python3
"""Benchmark: serial input, decoded lines per second per decoder on one core.

What it measures
----------------
For each decoder (json, csv, kv, nmea, cobs+cbor), `runnel run` reads a real
pseudo-terminal that this script fills from a file as fast as runnel takes
the bytes (a pty blocks the writer when its buffer is full, so nothing is
lost),
and runs the flow a user would write for such a device:

    key_on the device id, tumbling 10 s windows on the device's time with
    2 s of wait, aggregate temp mean/max and pm25 count, to a file.

(NMEA: one GPS receiver, keyed by talker, windowed on the receive time,
aggregating speed_kn and alt.)

The readings are shaped like real ones: 100 devices; nine fields per JSON
or CBOR reading (short strings, a nested object, a small list); seven CSV
columns, six kv tokens; each device's readings 60 ms apart with +-300 ms of
jitter, so neighbours arrive out of order; 0.5 % of readings late by 15-40 s.
NMEA: RMC and GGA sentences, as a receiver sends them.

runnel is pinned to CPU 0 and this script, which writes into the pty, to
CPU 1. Figures:
  cpu lines/s   lines / CPU seconds runnel spent from the first byte to the
                last (its start-up is measured before and left out): what one
                core decodes, windows included
  wall lines/s  lines / seconds from the first byte until runnel went idle
  x line rate   cpu lines/s over the most lines per second an 8N1 line at
                115200 and 921600 baud carries at this line length (baud / 10
                bytes per second / bytes per line)
Every run is checked: runnel's `in.items` equals the lines sent, nothing is
malformed, and each closed window's count equals a reference computed here
from the readings with Bytewax's lateness rule (Bytewax's windows are checked
against it too). Each contender runs --repeat times (default 3); the median
is shown.

Bytewax 0.21.1 runs the same job from a file of the same lines (it has no
serial input), decoding with json.loads / a csv reader / a split, in the same
run, for a ratio (JSON, CSV and kv only: it has no NMEA or COBS decoder).

How to run
----------
    cargo build --release -p runnel
    python3 tests/bench/serial_bench.py --bytewax-python .venv-test/bin/python
    python3 tests/bench/serial_bench.py --n 50000 --only json,kv --markdown

Needs taskset (util-linux). Standard library only. Exit status 1
when a run failed its check.
"""

import argparse
import json
import os
import pty
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
T0 = 1704067200.0
DECODERS = ("json", "csv", "kv", "nmea", "cbor")
CSV_COLUMNS = ["id", "ts", "temp", "rh", "pm25", "status", "fw"]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def readings(n, seed=7):
    """n readings of 100 devices in arrival order: per device 60 ms apart
    with +-300 ms jitter, 0.5 % late by 15-40 s."""
    rnd = random.Random(seed)
    keys = 100
    out = []
    for i in range(n):
        dev = i % keys
        step = i // keys
        ts = T0 + step * 0.06 + rnd.uniform(-0.3, 0.3)
        if rnd.random() < 0.005:
            ts -= rnd.uniform(15, 40)
        out.append({
            "id": f"dev-{dev:03d}",
            "ts": round(ts, 3),
            "temp": round(18 + 6 * rnd.random(), 2),
            "rh": round(30 + 40 * rnd.random(), 1),
            "pm25": rnd.randrange(0, 80),
            "status": rnd.choice(["ok", "ok", "ok", "warm", "low-batt"]),
            "fw": "1.4.2",
            "loc": {"x": round(rnd.uniform(0, 50), 2), "y": round(rnd.uniform(0, 20), 2)},
            "flags": [rnd.randrange(2), rnd.randrange(2)],
        })
    return out


def reference(rs):
    """(key, window id) -> count of readings that are not late: a reading is
    late when its time is below its key's watermark, the largest time seen
    before it minus the 2 s wait (Bytewax's rule; the watermark's advance
    with system time during a run of a few seconds is left out)."""
    top, want = {}, {}
    for r in rs:
        k, ts = r["id"], r["ts"]
        if k in top and ts < top[k] - 2.0:
            continue
        top[k] = max(top.get(k, ts), ts)
        w = (k, int((ts - T0) // 10))
        want[w] = want.get(w, 0) + 1
    return want


def window_counts(path):
    """(key, window id) -> pm25 count, from either program's output lines."""
    got = {}
    if not path.exists():
        return got
    for line in path.read_text().splitlines():
        if line.strip():
            key, (wid, stats) = json.loads(line)
            got[(key, wid)] = stats["pm25"]["count"]
    return got


def compare(got, want):
    """'ok', or how many windows differ (a window still open at the end is not
    compared: the last ones of each key stay open)."""
    last = {}
    for (k, w) in want:
        last[k] = max(last.get(k, w), w)
    closed = {kw: n for kw, n in want.items() if kw[1] < last[kw[0]] - 1}
    bad = sum(1 for kw, n in closed.items() if got.get(kw) != n)
    return "ok" if bad == 0 else f"{bad} of {len(closed)} windows differ"


def nmea(body):
    s = 0
    for b in body.encode():
        s ^= b
    return f"${body}*{s:02X}\r\n"


def nmea_lines(n, seed=7):
    rnd = random.Random(seed)
    out = []
    for i in range(n // 2):
        t = i // 10
        hh, mm, ss = (t // 3600) % 24, (t // 60) % 60, t % 60
        frac = i % 10
        utc = f"{hh:02d}{mm:02d}{ss:02d}.{frac}0"
        lat = 4807.038 + rnd.uniform(-0.01, 0.01)
        lon = 1131.0 + rnd.uniform(-0.01, 0.01)
        speed = rnd.uniform(0, 40)
        out.append(nmea(f"GPRMC,{utc},A,{lat:09.4f},N,{lon:010.4f},E,{speed:05.1f},084.4,010124,003.1,W"))
        out.append(nmea(f"GPGGA,{utc},{lat:09.4f},N,{lon:010.4f},E,1,08,0.9,{500 + rnd.uniform(0, 50):.1f},M,46.9,M,,"))
    return out


def kv_line(r):
    return f"id={r['id']} ts={r['ts']} temp={r['temp']} rh={r['rh']} pm25={r['pm25']} status={r['status']}\n"


def csv_line(r):
    return ",".join(str(r[c]) for c in CSV_COLUMNS) + "\n"


def cobs(data):
    out = bytearray([0])
    code_at, code = 0, 1
    for b in data:
        if b != 0:
            out.append(b)
            code += 1
        if b == 0 or code == 0xFF:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
    out[code_at] = code
    return bytes(out)


def cbor(v):
    """A minimal CBOR encoder for the reading's types."""
    def head(major, n):
        if n < 24:
            return bytes([major << 5 | n])
        if n < 256:
            return bytes([major << 5 | 24, n])
        if n < 65536:
            return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
        return bytes([major << 5 | 26]) + n.to_bytes(4, "big")
    if isinstance(v, bool):
        return b"\xf5" if v else b"\xf4"
    if isinstance(v, int):
        return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, float):
        import struct
        return b"\xfb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return head(3, len(b)) + b
    if isinstance(v, list):
        return head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict):
        return head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(type(v))


def write_data(decoder, n, path):
    """The device's byte stream, and the number of frames (lines) in it."""
    if decoder == "nmea":
        lines = nmea_lines(n)
        path.write_bytes("".join(lines).encode())
        return len(lines)
    rs = readings(n)
    if decoder == "json":
        data = "".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in rs).encode()
    elif decoder == "csv":
        data = "".join(csv_line(r) for r in rs).encode()
    elif decoder == "kv":
        data = "".join(kv_line(r) for r in rs).encode()
    else:
        data = b"".join(cobs(cbor(r)) + b"\x00" for r in rs)
    path.write_bytes(data)
    return n


# --------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------

def runnel_flow(decoder, port):
    args = {
        "json": 'decode="json"',
        "csv": f'decode="csv", columns={CSV_COLUMNS!r}',
        "kv": 'decode="kv"',
        "nmea": 'decode="nmea", timestamp_field="received"',
        "cbor": 'framing="cobs", decode="cbor"',
    }[decoder]
    if decoder == "nmea":
        key, clock, spec = ("talker", 'win.EventClock("received", wait_for_system_duration=timedelta(seconds=1))',
                            '{"speed_kn": ["mean", "max"], "alt": ["mean"]}')
    else:
        key, clock, spec = ("id", 'win.EventClock("ts", wait_for_system_duration=timedelta(seconds=2), unit="s")',
                            '{"temp": ["mean", "max"], "pm25": ["count"]}')
    return f'''from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("bench")
items = op.input("in", flow, sources.serial({str(port)!r}, baud=921600, {args}))
keyed = op.key_on("by_key", items, {key!r})
windower = win.TumblingWindower(timedelta(seconds=10), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("stats", keyed, {clock}, windower, {spec})
op.output("out", stats.down, sinks.file("out.jsonl"))
'''


BYTEWAX_FLOW = '''
import csv, json, os
from datetime import datetime, timedelta, timezone
import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow

DECODER = os.environ["BENCH_DECODER"]
COLUMNS = %r

def cell(s):
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return s

def parse_csv(line):
    return dict(zip(COLUMNS, (cell(c) for c in next(csv.reader([line])))))

def parse_kv(line):
    return {k: cell(v) for k, v in (t.split("=", 1) for t in line.split())}

parse = {"json": json.loads, "csv": parse_csv, "kv": parse_kv}[DECODER]

def builder():
    return [0.0, float("-inf"), 0, 0]

def folder(acc, r):
    acc[0] += r["temp"]; acc[1] = max(acc[1], r["temp"]); acc[2] += 1; acc[3] += 1
    return acc

def merger(a, b):
    return [a[0] + b[0], max(a[1], b[1]), a[2] + b[2], a[3] + b[3]]

def out(kv):
    key, (wid, acc) = kv
    return key, json.dumps([key, [wid, {"temp": {"mean": acc[0] / acc[2], "max": acc[1]}, "pm25": {"count": acc[3]}}]])

flow = Dataflow("bench")
lines = op.input("in", flow, FileSource(os.environ["BENCH_DATA"]))
rs = op.map("parse", lines, parse)
keyed = op.key_on("key", rs, lambda r: r["id"])
clock = win.EventClock(lambda r: datetime.fromtimestamp(r["ts"], tz=timezone.utc), wait_for_system_duration=timedelta(seconds=2))
windower = win.TumblingWindower(timedelta(seconds=10), datetime(2024, 1, 1, tzinfo=timezone.utc))
w = win.fold_window("agg", keyed, clock, windower, builder, folder, merger)
op.output("out", op.map("fmt", w.down, out), FileSink(os.environ["BENCH_OUT"]))
''' % (CSV_COLUMNS,)


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def feed(master, data):
    with open(data, "rb") as f:
        while chunk := f.read(4096):
            view = memoryview(chunk)
            while view:
                view = view[os.write(master, view):]


def run_runnel(runnel, decoder, n, work):
    d = work / decoder
    shutil.rmtree(d, ignore_errors=True)
    (d / "flows").mkdir(parents=True)
    data = d / "device.bin"
    frames = write_data(decoder, n, data)
    size = data.stat().st_size
    link = d / "tty"
    (d / "flows" / "bench.py").write_text(runnel_flow(decoder, link))
    (d / "runnel.toml").write_text(
        f'device_id = "bench"\nflows_dir = "{d / "flows"}"\nstate_dir = "{d / "state"}"\nlog_level = "info"\n')
    # The device: a pty pair made here; runnel opens the slave through the
    # link, this process writes the file into the master (blocking while the
    # pty's buffer is full) and keeps it open until runnel is done: closing
    # it would hang the line up and drop what the kernel still buffers.
    master, slave = pty.openpty()
    os.symlink(os.ttyname(slave), link)
    log_path = d / "runnel.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen(["taskset", "-c", "0", str(runnel), "run", "--config", str(d / "runnel.toml")],
                                 stdout=subprocess.DEVNULL, stderr=log)
    os.close(slave)
    try:
        wait_for(lambda: "reading " in log_path.read_text(), 20, "runnel to open the port")
        start_cpu = cpu_seconds(agent.pid)
        start = time.monotonic()
        writer = threading.Thread(target=feed, args=(master, data))
        writer.start()
        last_cpu, idle_since = start_cpu, None
        while True:
            time.sleep(0.05)
            cpu = cpu_seconds(agent.pid)
            now = time.monotonic()
            if cpu != last_cpu:
                last_cpu, idle_since = cpu, None
            elif not writer.is_alive():
                idle_since = idle_since or now
                if now - idle_since >= 0.5:
                    break
            if now - start > 600:
                raise RuntimeError("runnel did not finish within 600 s")
        wall = idle_since - start
        cpu = last_cpu - start_cpu
        agent.terminate()
        agent.wait(timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
        os.close(master)
    text = log_path.read_text()
    m = re.search(r"flow bench stopped: (.*)", text)
    counters = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}
    items = int(counters.get("in.items", "0"))
    bad = int(counters.get("in.malformed", "0")) + int(counters.get("in.partial_frames", "0"))
    check = "ok" if items == frames and bad == 0 else f"FAILED: {items} of {frames} items, {bad} bad"
    if check == "ok" and decoder != "nmea":
        check = compare(window_counts(d / "flows" / "out.jsonl"), reference(readings(n)))
    return {"frames": frames, "bytes": size, "cpu": cpu, "wall": wall, "check": check}


def run_bytewax(python, decoder, n, work):
    d = work / f"bytewax-{decoder}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    data = d / "lines.txt"
    rs = readings(n)
    if decoder == "json":
        data.write_text("".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in rs))
    elif decoder == "csv":
        data.write_text("".join(csv_line(r) for r in rs))
    else:
        data.write_text("".join(kv_line(r) for r in rs))
    flow = d / "flow.py"
    flow.write_text(BYTEWAX_FLOW)
    env = dict(os.environ, BENCH_DECODER=decoder, BENCH_DATA=str(data), BENCH_OUT=str(d / "out.jsonl"))
    start = time.monotonic()
    with open(d / "stderr.txt", "w") as err:
        p = subprocess.Popen(["taskset", "-c", "0", str(python), "-m", "bytewax.run", str(flow)], cwd=d, env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    ok = p.returncode == 0
    check = compare(window_counts(d / "out.jsonl"), reference(rs)) if ok and n else "-"
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "ok": ok, "check": check,
            "err": (d / "stderr.txt").read_text()[-500:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runnel", default=str(ROOT / "target" / "release" / "runnel"))
    ap.add_argument("--bytewax-python", default=os.environ.get("RUNNEL_BYTEWAX_PYTHON")
                    or str(ROOT / ".venv-test" / "bin" / "python"))
    ap.add_argument("--n", type=int, default=200_000, help="readings per decoder (default 200000)")
    ap.add_argument("--only", default=",".join(DECODERS))
    ap.add_argument("--no-bytewax", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; the median is shown (default 3)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "runnel-serial-bench"))
    args = ap.parse_args()
    os.sched_setaffinity(0, {1} if os.cpu_count() > 1 else {0})
    for tool in ("taskset",):
        if not shutil.which(tool):
            sys.exit(f"serial_bench: {tool} is not installed (apt-get install util-linux)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    have_bytewax = not args.no_bytewax and Path(args.bytewax_python).exists()
    rows, failed = [], False
    bw_start = None
    for decoder in [d for d in args.only.split(",") if d]:
        if decoder not in DECODERS:
            sys.exit(f"serial_bench: unknown decoder {decoder!r}; one of {', '.join(DECODERS)}")
        runs = [run_runnel(args.runnel, decoder, args.n, work) for _ in range(args.repeat)]
        r = sorted(runs, key=lambda x: x["cpu"])[len(runs) // 2]
        r["check"] = next((x["check"] for x in runs if x["check"] != "ok"), "ok")
        failed |= r["check"] != "ok"
        per_line = r["bytes"] / r["frames"]
        cpu_rate = r["frames"] / max(r["cpu"], 1e-9)
        wall_rate = r["frames"] / max(sorted(x["wall"] for x in runs)[len(runs) // 2], 1e-9)
        rate = lambda baud: baud / 10 / per_line
        bw = ""
        if have_bytewax and decoder in ("json", "csv", "kv"):
            # Its start-up (interpreter, imports, the dataflow) left out, as runnel's is.
            if bw_start is None:
                bw_start = min(run_bytewax(args.bytewax_python, "json", 0, work)["cpu"] for _ in range(2))
            bws = [run_bytewax(args.bytewax_python, decoder, args.n, work) for _ in range(args.repeat)]
            if all(b["ok"] for b in bws):
                b = sorted(bws, key=lambda x: x["cpu"])[len(bws) // 2]
                bw_rate = args.n / max(b["cpu"] - bw_start, 1e-9)
                bw = f"{bw_rate:,.0f} ({cpu_rate / bw_rate:.1f}x)"
                if b["check"] != "ok":
                    bw += f" [its windows: {b['check']}]"
            else:
                bw = "failed"
                failed = True
                print(next(b["err"] for b in bws if not b["ok"]), file=sys.stderr)
        rows.append([decoder, f"{per_line:.0f}", f"{cpu_rate:,.0f}", f"{wall_rate:,.0f}",
                     f"{cpu_rate / rate(115200):,.0f}x", f"{cpu_rate / rate(921600):,.0f}x", bw or "-", r["check"]])
        print(f"  {decoder}: {r}", file=sys.stderr)
    head = ["decoder", "bytes/line", "cpu lines/s", "wall lines/s", "x 115200 baud", "x 921600 baud",
            "Bytewax cpu lines/s (runnel x)", "check"]
    print(f"serial_bench: {args.n} readings per decoder, runnel on CPU 0, "
          f"{os.cpu_count()} CPUs, {os.uname().machine}")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
