#!/usr/bin/env python3
"""SD-card budget: what `runnel run` writes to disk in an hour of sensor data.

100 readings/s (20 sensors, 5 readings/s each, seven fields, a second of
jitter, 0.5 % late) go through a real mosquitto into a flow that keeps
one-minute aggregates per sensor and publishes them upstream (a second
mosquitto) through the outbox. Upstream goes away for the middle ten minutes
of the hour (the outbox fills) and comes back (it drains).

Time is compressed by `--speed` (default 10: an hour in six minutes): the
readings' event time runs `speed` times faster than the clock, and so does
every timer runnel has that depends on it (`snapshot_interval` and
`commit_gap` are divided by `speed`), so runnel commits as often per simulated hour as it would in a real
one. The figures: bytes written to disk (`/proc/PID/io` write_bytes, which
counts what reaches the block layer, fsyncs included) and the redb file's
size over time.

    .venv-test/bin/python tests/bench/sd_budget.py            # default settings
    .venv-test/bin/python tests/bench/sd_budget.py --ack after-commit

Needs mosquitto (Debian) and paho-mqtt (in .venv-test, see tests/run_all.sh).
Exits 1 if more than --budget-mb (default 50) MB are written per simulated hour.
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
T0 = 1704067200.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, d: Path, extra: str = ""):
        self.dir = d
        self.port = free_port()
        d.mkdir(parents=True, exist_ok=True)
        user = "user root\n" if os.geteuid() == 0 else ""
        (d / "m.conf").write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{user}persistence false\n{extra}")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(self.dir / "m.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("mosquitto did not start")

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


FLOW = """
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("greenhouse")
readings = op.input("in", flow, sources.mqtt("sensors/{sensor}/reading", ack=ACK))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=WAIT), unit="s")
minutes = win.TumblingWindower(length=timedelta(minutes=1), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per_minute", keyed, clock, minutes,
                      {"temp": ["count", "mean", "min", "max", "p90"], "rh": ["mean"]})
op.output("up", stats.down, sinks.mqtt("fleet/{device_id}/{flow}/{key}"))
"""


def io_written(pid):
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=100, help="readings per simulated second")
    ap.add_argument("--minutes", type=float, default=60.0, help="simulated minutes")
    ap.add_argument("--ack", default="on-receive", choices=["on-receive", "after-commit"])
    ap.add_argument("--commit-gap", type=float, default=1.0, help="runnel's commit_gap, in simulated seconds")
    ap.add_argument("--snapshot-interval", type=float, default=20.0,
                    help="runnel's snapshot_interval, in simulated seconds (default: runnel's default)")
    ap.add_argument("--max-inflight", type=int, default=20,
                    help="mosquitto's max_inflight_messages and runnel's max_inflight")
    ap.add_argument("--budget-mb", type=float, default=50.0)
    ap.add_argument("--runnel", default=str(ROOT / "target/release/runnel"))
    args = ap.parse_args()
    import paho.mqtt.client as mqtt

    tmp = Path(tempfile.mkdtemp(prefix="runnel-sd-"))
    ingest = Broker(tmp / "ingest", f"max_inflight_messages {args.max_inflight}\n")
    upstream = Broker(tmp / "upstream")
    (tmp / "flows").mkdir()
    # The wait is in event time (readings' timestamps), so it is not scaled.
    (tmp / "flows/greenhouse.py").write_text(FLOW.replace("ACK", repr(args.ack)).replace("WAIT", "10"))
    persistent = "persistent_session = true\n" if args.ack == "after-commit" else ""
    (tmp / "runnel.toml").write_text(
        f'device_id = "pi"\nflows_dir = "flows"\nstate_dir = "state"\nstatus_interval = 0\n'
        f"snapshot_interval = {args.snapshot_interval / args.speed}\ncommit_gap = {args.commit_gap / args.speed}\n\n"
        f'[brokers.default]\nhost = "127.0.0.1"\nport = {ingest.port}\nmax_inflight = {args.max_inflight}\n{persistent}\n'
        f'[brokers.upstream]\nhost = "127.0.0.1"\nport = {upstream.port}\nreconnect_max = 1\n')
    agent = subprocess.Popen([args.runnel, "run", "--config", str(tmp / "runnel.toml")], cwd=tmp,
                             stderr=open(tmp / "runnel.log", "w"))
    log = tmp / "runnel.log"
    for _ in range(200):
        if "connected to broker default" in log.read_text():
            break
        time.sleep(0.05)
    else:
        raise SystemExit("runnel did not connect:\n" + log.read_text())
    time.sleep(1.0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sd-feed")
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", ingest.port)
    pub.loop_start()
    start_written = io_written(agent.pid)
    redb = tmp / "state/runnel.redb"
    rng = random.Random(1)
    sensors = [f"s{i:02d}" for i in range(20)]
    total = int(args.minutes * 60 * args.rate)
    per_real_s = args.rate * args.speed
    began = time.monotonic()
    samples = []
    down_from, down_to = 0.4 * total, 0.4 * total + 10 * 60 * args.rate
    for i in range(total):
        if i == int(down_from):
            upstream.stop()
        if i == int(down_to):
            upstream.start()
        sim_s = i / args.rate
        ts = T0 + sim_s + rng.uniform(-1, 1)
        if rng.random() < 0.005:
            ts -= rng.uniform(15, 40)
        s = rng.choice(sensors)
        payload = json.dumps({"ts": round(ts, 3), "temp": round(rng.gauss(21, 2), 2), "rh": rng.randint(30, 70),
                              "fw": "1.4.2", "loc": {"row": 3, "bed": 7}, "flags": [0, 1], "bat": 3.71})
        pub.publish(f"sensors/{s}/reading", payload, qos=1)
        if i % (args.rate * 60 * 5) == 0:
            samples.append((sim_s / 60, redb.stat().st_size if redb.exists() else 0))
        # Pace: reading i goes out at i / per_real_s seconds.
        ahead = i / per_real_s - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)
    # A minute and a half of simulated time for the last windows and the outbox.
    time.sleep(90 / args.speed + 2)
    samples.append((args.minutes, redb.stat().st_size))
    written = io_written(agent.pid) - start_written
    measured_s = time.monotonic() - began
    pub.loop_stop()
    agent.terminate()
    agent.wait(10)
    ingest.stop()
    upstream.stop()
    text = log.read_text()
    # Per simulated hour of the time measured (the feed and the tail after it).
    hours = measured_s * args.speed / 3600
    mb_per_hour = written / 1e6 / hours
    print(f"ack={args.ack} max_inflight={args.max_inflight} snapshot_interval={args.snapshot_interval}s commit_gap={args.commit_gap}s rate={args.rate}/s speed={args.speed}x simulated={hours * 60:.0f} min "
          f"(real {measured_s:.0f} s)")
    print(f"written to disk: {written / 1e6:.1f} MB = {mb_per_hour:.1f} MB per simulated hour "
          f"(budget {args.budget_mb:.0f} MB)")
    print("redb file size (simulated minute: bytes): " + ", ".join(f"{m:.0f}: {b}" for m, b in samples))
    for line in text.splitlines():
        if "greenhouse stopped" in line or "checkpoints" in line:
            print("runnel:", line.split("INFO", 1)[-1].strip())
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if mb_per_hour > args.budget_mb else 0)


if __name__ == "__main__":
    main()
