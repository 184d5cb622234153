#!/usr/bin/env python3
"""Footprint: memory, start-up time and binary size of `runnel run`, against budgets.

What it measures
----------------
Every run is `runnel run --config runnel.toml` in a fresh temp dir (its own
state_dir and flows_dir, no brokers), with NOTIFY_SOCKET pointing at a unix
datagram socket of this script, so the time of `READY=1` is known (see
agent/src/systemd.rs: READY once the flows are loaded). Memory figures are
VmRSS, VmHWM, RssAnon, RssFile and Threads from /proc/PID/status.

  idle RSS        VmRSS --idle-seconds (default 5) after READY, sampled every
                  second on the way (so growth at idle shows), of:
                    demo   flows/demo.py and its captures/ (the file input is
                           replayed and ended: "loaded and finished");
                           THE BUDGET APPLIES TO THIS ONE: <= 14 MiB
                    fifo   the load flow below, its FIFO open and silent
                           (measured in the same process as the load, before it)
                    none   no flow at all (the agent's own base)
  RSS under load  the fifo flow: sources.file(FIFO), key_on "sensor",
                  EventClock "ts" (wait 2 s), 10 s tumbling windows,
                  win.aggregate temp count+mean, sinks.file. A writer thread
                  paces JSON lines into the FIFO at --rate (default 10,000) per
                  second for --load-seconds (default 10): 1,000 sensors, ts =
                  now, temp, hum, status. It starts 5 s into a 10 s window, so
                  every run has 1,000 windows close 7 s into the load. VmRSS
                  every 0.5 s: max and last (VmHWM at the load's end and after
                  EOF are shown too). Checked: windows closed while the load
                  ran (loads of 8 s or more), and after the FIFO is closed (EOF
                  flushes the rest) the input count and the windows' counts
                  (plus late items) equal the lines sent.
                  Budget: max sampled VmRSS <= 32 MiB.
  start to READY  spawn to READY=1, the demo config, 3 starts in one dir (the
                  first creates the state file); median. Budget: <= 1.5 s.
  binary size     --runnel (default <repo>/target/release/runnel): printed
                  only; --aarch64 (default: the first path that
                  `cross/build --print-paths` prints, which builds nothing, if
                  that file exists): < 6,000,000 bytes (the .deb test's limit).

How to run
----------
    cargo build --release -p runnel
    python3 tests/bench/footprint.py
    python3 tests/bench/footprint.py --markdown          # tables for the README
    python3 tests/bench/footprint.py --rate 20000 --load-seconds 30 --keep

Options: --runnel, --aarch64, --idle-seconds, --rate, --load-seconds,
--markdown, --keep (leave the temp dirs, and say where). Linux only (/proc).
Standard library only. Exit status: 0 when every budget is met, 1 when one is
exceeded, 2 on a setup error (no binary, runnel did not start or reach READY,
or the load did not flow, so its figure would mean nothing).
"""

import argparse
import errno
import fcntl
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
IDLE_BUDGET_KIB = 14 * 1024          # demo flow, idle
LOAD_BUDGET_KIB = 32 * 1024          # max VmRSS under --rate
READY_BUDGET_S = 1.5                 # median spawn -> READY=1
AARCH64_BUDGET_BYTES = 6_000_000     # strictly below
READY_TIMEOUT_S = 30.0               # flow_load_timeout (10 s) + the 3 s broker wait, and slack
SENSORS = 1000
START_PHASE_S = 5.0                  # the load starts this far into a 10 s window
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")

LOAD_FLOW = """\
\"\"\"footprint.py's load flow: readings from a FIFO, mean per sensor and 10 s.\"\"\"

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

flow = Dataflow("footprint")
readings = op.input("in", flow, sources.file(FIFO))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=2), unit="s")
windows = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("mean", keyed, clock, windows, {"temp": ["count", "mean"]})
op.output("out", stats.down, sinks.file(OUT))
"""


class SetupError(Exception):
    """Something other than a budget went wrong: exit 2."""


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------

def proc_status(pid):
    """{field: int} for STATUS_FIELDS (kB for the Vm/Rss ones)."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise SetupError(f"cannot read /proc/{pid}/status: {e}") from e
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(rest.split()[0])
    return out


def kib(v):
    return f"{v:,} KiB ({v / KIB:.1f} MiB)"


# --------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------

class Agent:
    """`runnel run` in `work` with its own NOTIFY_SOCKET. A context manager:
    the agent is killed on the way out if it still runs."""

    def __init__(self, runnel, work: Path):
        self.work = work
        self.log = work / "runnel.log"
        self.messages = []              # (monotonic time, datagram text)
        self._lock = threading.Lock()
        self._closed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(work / "notify.sock"))
        self.sock.settimeout(0.1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # The measurement is of runnel's defaults: no RUNNEL_* overrides, no
        # watchdog or journal from a surrounding systemd.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RUNNEL_", "WATCHDOG_")) and k != "JOURNAL_STREAM"}
        env["NOTIFY_SOCKET"] = str(work / "notify.sock")
        self.t0 = time.monotonic()
        try:
            with open(work / "stdout.txt", "wb") as out, open(self.log, "wb") as err:
                self.proc = subprocess.Popen([runnel, "run", "--config", str(work / "runnel.toml")], cwd=work,
                                             env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as e:
            self._closed = True
            self.sock.close()
            raise SetupError(f"cannot start {runnel}: {e}") from e
        self.pid = self.proc.pid
        self.ready_s = None

    def _read(self):
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def log_tail(self, n=15):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout=READY_TIMEOUT_S):
        """Seconds from spawn to READY=1."""
        deadline = self.t0 + timeout
        while True:
            with self._lock:
                for t, msg in self.messages:
                    if "READY=1" in msg.split("\n"):
                        self.ready_s = t - self.t0
                        self.ready_at = t
                        return self.ready_s
            if self.proc.poll() is not None:
                raise SetupError(f"runnel exited with {self.proc.returncode} before READY=1:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SetupError(f"no READY=1 within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.002)

    def statuses(self):
        with self._lock:
            return [line[len("STATUS="):] for _, m in self.messages for line in m.split("\n")
                    if line.startswith("STATUS=")]

    def status(self):
        if self.proc.poll() is not None:
            raise SetupError(f"runnel exited with {self.proc.returncode}:\n{self.log_tail()}")
        return proc_status(self.pid)

    def stop(self, timeout=10.0):
        """SIGTERM and wait: (exit code, seconds it took)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print(f"  warning: runnel did not stop within {timeout:.0f} s of SIGTERM; killed")
        return self.proc.returncode, time.monotonic() - t

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._closed = True
        self._reader.join(1)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def write_config(work: Path):
    (work / "flows").mkdir(mode=0o755, exist_ok=True)
    os.chmod(work / "flows", 0o755)
    (work / "runnel.toml").write_text(
        f'device_id = "footprint"\nstate_dir = "{work / "state"}"\nflows_dir = "{work / "flows"}"\n')


def put(path: Path, text: str):
    path.write_text(text)
    os.chmod(path, 0o644)


def demo_dir(work: Path):
    """The demo flow and its capture in work/flows."""
    write_config(work)
    shutil.copy(ROOT / "flows/demo.py", work / "flows/demo.py")
    os.chmod(work / "flows/demo.py", 0o644)
    shutil.copytree(ROOT / "flows/captures", work / "flows/captures", ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(work / "flows/captures"):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


def flow_counters(agent: Agent, flow):
    """The counters of the agent's `flow <flow> finished: a=1 b=2` line."""
    for line in agent.log.read_text(errors="replace").splitlines():
        if f"flow {flow} finished:" in line:
            pairs = line.split(f"flow {flow} finished:", 1)[1].split()
            return {k: int(v) for k, _, v in (p.partition("=") for p in pairs) if v.isdigit()}
    return {}


def wait_log(agent: Agent, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in agent.log.read_text(errors="replace"):
            return True
        if agent.proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def idle(agent: Agent, seconds, label):
    """Samples every second from READY to READY + seconds; the last one is the figure."""
    samples = []
    for i in range(1, int(seconds) + 1):
        time.sleep(max(0.0, agent.ready_at + i - time.monotonic()))
        samples.append(agent.status())
    rest = seconds - int(seconds)
    if rest > 0 or not samples:
        time.sleep(max(0.0, agent.ready_at + seconds - time.monotonic()))
        samples.append(agent.status())
    last = samples[-1]
    series = " ".join(str(s["VmRSS"]) for s in samples)
    print(f"  {label}: VmRSS each second after READY (KiB): {series}")
    grew = last["VmRSS"] - samples[0]["VmRSS"]
    if grew > 256:
        print(f"  note: VmRSS grew by {grew} KiB while idle")
    return last


# --------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------

def run_idle_demo(runnel, tmp: Path, seconds):
    work = tmp / "idle-demo"
    work.mkdir()
    demo_dir(work)
    print(f"idle, demo flow ({seconds:g} s after READY):")
    with Agent(runnel, work) as agent:
        ready = agent.wait_ready()
        print(f"  READY after {ready:.3f} s; STATUS: {agent.statuses()[-1:] or '(none)'}")
        if not wait_log(agent, "every input has ended", 10):
            raise SetupError(f"the demo flow's input did not end:\n{agent.log_tail()}")
        st = idle(agent, seconds, "demo")
        rc, took = agent.stop()
        c = flow_counters(agent, "greenhouse")
        print(f"  stopped with {rc} in {took:.2f} s; readings.items={c.get('readings.items')} "
              f"summary.items={c.get('summary.items')}")
        if not c.get("summary.items"):
            raise SetupError(f"the demo flow put out no summaries:\n{agent.log_tail()}")
    return st


def run_idle_none(runnel, tmp: Path, seconds):
    work = tmp / "idle-none"
    work.mkdir()
    write_config(work)
    print(f"idle, no flows ({seconds:g} s after READY):")
    with Agent(runnel, work) as agent:
        ready = agent.wait_ready()
        print(f"  READY after {ready:.3f} s")
        st = idle(agent, seconds, "none")
        rc, took = agent.stop()
        print(f"  stopped with {rc} in {took:.2f} s")
    return st


def open_writer(path: Path, agent: Agent, timeout=10.0):
    """The FIFO's write end, once runnel has it open for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if agent.proc.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"runnel did not open the FIFO {path}:\n{agent.log_tail()}") from e
            time.sleep(0.01)
            continue
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd


class Feeder(threading.Thread):
    """Paces JSON lines into fd: `rate` per second for `seconds`, in 10 ms chunks."""

    def __init__(self, fd, rate, seconds, seed=1):
        super().__init__(daemon=True)
        self.fd, self.rate, self.total = fd, rate, int(rate * seconds)
        self.rnd = random.Random(seed)
        self.sent = 0
        self.took = 0.0
        self.error = None

    def line(self):
        r = self.rnd
        st = "ok" if r.random() < 0.9 else r.choice(("warm", "low-batt", "no-fix"))
        return (f'{{"sensor": "s{r.randrange(SENSORS):04d}", "ts": {time.time():.3f}, '
                f'"temp": {r.gauss(21, 3):.2f}, "hum": {r.uniform(30, 80):.1f}, "status": "{st}"}}\n')

    def run(self):
        began = time.monotonic()
        try:
            while self.sent < self.total:
                due = min(self.total, int((time.monotonic() - began) * self.rate) + 1)
                if due > self.sent:
                    data = "".join(self.line() for _ in range(due - self.sent)).encode()
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.fd, view):]
                    self.sent = due
                time.sleep(0.01)
        except OSError as e:
            self.error = e
        self.took = time.monotonic() - began


def run_load(runnel, tmp: Path, idle_seconds, rate, seconds):
    """The fifo idle figure, then the load; both from one agent."""
    work = tmp / "load"
    work.mkdir()
    write_config(work)
    fifo, out = work / "in.fifo", work / "out.jsonl"
    os.mkfifo(fifo, 0o600)
    put(work / "flows/footprint.py", LOAD_FLOW.replace("FIFO", repr(str(fifo))).replace("OUT", repr(str(out))))
    print(f"idle, FIFO flow open and silent ({idle_seconds:g} s after READY), then {rate:,} readings/s "
          f"for {seconds:g} s:")
    fd = None
    with Agent(runnel, work) as agent:
        try:
            ready = agent.wait_ready()
            print(f"  READY after {ready:.3f} s")
            fd = open_writer(fifo, agent)
            idle_st = idle(agent, idle_seconds, "fifo")
            # Windows are 10 s on the epoch's grid: start 5 s past a boundary,
            # so that one closes (2 s of wait) 7 s into the load, every run
            # (a close, its output and commit are part of the footprint).
            time.sleep((START_PHASE_S - time.time() % 10) % 10)

            feeder = Feeder(fd, rate, seconds)
            samples = []
            began = time.monotonic()
            feeder.start()
            while feeder.is_alive():
                time.sleep(max(0.0, began + 0.5 * (len(samples) + 1) - time.monotonic()))
                samples.append(agent.status())
            feeder.join()
            if feeder.error:
                raise SetupError(f"writing the FIFO failed after {feeder.sent} lines: {feeder.error}\n"
                                 f"{agent.log_tail()}")
            live_windows = count_lines(out)
            at_end = agent.status()  # its VmHWM: the peak, between samples too
            os.close(fd)
            fd = None
            ended = wait_log(agent, "every input has ended", 30)
            after = agent.status()
            rc, took = agent.stop()
        finally:
            if fd is not None:
                os.close(fd)
        c = flow_counters(agent, "footprint")

    series = " ".join(str(s["VmRSS"]) for s in samples)
    print(f"  VmRSS every 0.5 s under load (KiB): {series}")
    achieved = feeder.sent / feeder.took if feeder.took else 0.0
    print(f"  sent {feeder.sent:,} lines in {feeder.took:.2f} s ({achieved:,.0f}/s); "
          f"{live_windows:,} windows written while the load ran; VmHWM at its end {at_end['VmHWM']} KiB; after EOF VmRSS {after['VmRSS']} KiB, "
          f"VmHWM {after['VmHWM']} KiB")
    if achieved < 0.95 * rate:
        print(f"  note: the writer reached only {achieved:,.0f} lines/s of {rate:,} (runnel kept the FIFO full?)")
    windows, counted = 0, 0
    for text in out.read_text().splitlines() if out.exists() else []:
        if text.strip():
            _key, (_wid, v) = json.loads(text)
            windows += 1
            counted += v["temp"]["count"]
    late = c.get("mean.late", 0)
    print(f"  stopped with {rc} in {took:.2f} s; in.items={c.get('in.items')} mean.late={late} "
          f"windows={windows:,} counted in windows={counted:,}")
    problems = []
    if not ended:
        problems.append("the input did not end after the FIFO was closed")
    if windows == 0:
        problems.append("no windows in the output")
    # The first window closes 7 s into the load (START_PHASE_S and the 2 s
    # wait): a shorter load has none closed while it ran.
    if live_windows == 0:
        if seconds >= 10 - START_PHASE_S + 2 + 1:
            problems.append(f"no window closed during {seconds:g} s of load")
        else:
            print(f"  note: no window closed while the load ran ({seconds:g} s; the first closes "
                  f"{10 - START_PHASE_S + 2:g} s into it)")
    if c.get("in.items") != feeder.sent:
        problems.append(f"in.items={c.get('in.items')} but {feeder.sent} lines were sent")
    if counted + late != feeder.sent:
        problems.append(f"windows counted {counted} and {late} were late, of {feeder.sent} sent")
    if problems:
        raise SetupError("the load did not flow: " + "; ".join(problems) + "\n" + agent.log_tail())
    peak = max(samples, key=lambda s: s["VmRSS"])
    return idle_st, peak, samples[-1], at_end['VmHWM'], after, achieved


def count_lines(path: Path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def run_ready(runnel, tmp: Path, starts=3):
    work = tmp / "ready"
    work.mkdir()
    demo_dir(work)
    times = []
    for i in range(starts):
        with Agent(runnel, work) as agent:
            times.append(agent.wait_ready())
            rc, took = agent.stop()
            print(f"  start {i + 1}: READY after {times[-1]:.3f} s; stopped with {rc} in {took:.2f} s")
        (work / "notify.sock").unlink()
    return times


def aarch64_default():
    script = ROOT / "cross/build"
    if not script.exists():
        return None
    try:
        out = subprocess.run([str(script), "--print-paths"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0].strip() if out.strip() else ""
    return first if first and Path(first).is_file() else None


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def table(head, rows, markdown, right=()):
    """Plain columns, or a markdown table with the columns in `right` right-aligned."""
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runnel", default=str(ROOT / "target/release/runnel"))
    ap.add_argument("--aarch64", default=None,
                    help="the aarch64 binary (default: cross/build --print-paths' first line, if it exists)")
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=10_000, help="readings per second under load")
    ap.add_argument("--load-seconds", type=float, default=10.0)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    args = ap.parse_args()
    if args.idle_seconds <= 0 or args.load_seconds <= 0 or args.rate <= 0:
        ap.error("--idle-seconds, --load-seconds and --rate must be positive")

    runnel = str(Path(args.runnel).resolve())
    if not (os.path.isfile(runnel) and os.access(runnel, os.X_OK)):
        print(f"footprint: no runnel binary at {runnel} (cargo build --release -p runnel)", file=sys.stderr)
        return 2
    if args.aarch64 is not None and not Path(args.aarch64).is_file():
        print(f"footprint: no aarch64 binary at {args.aarch64}", file=sys.stderr)
        return 2
    aarch64 = args.aarch64 or aarch64_default()
    try:
        version = (subprocess.run([runnel, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
                   or "runnel (no --version)").splitlines()[0]
    except (OSError, subprocess.SubprocessError) as e:
        print(f"footprint: cannot run {runnel} --version: {e}", file=sys.stderr)
        return 2
    print(f"{version} ({runnel}); {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")

    # SIGTERM (and SIGINT, even where a shell started this in the background
    # with it ignored) ends the run through the cleanup below: the agent is
    # killed and the temp dir removed.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    tmp = Path(tempfile.mkdtemp(prefix="runnel-footprint-"))
    try:
        demo = run_idle_demo(runnel, tmp, args.idle_seconds)
        none = run_idle_none(runnel, tmp, args.idle_seconds)
        fifo, peak, last, load_hwm, after_eof, achieved = run_load(runnel, tmp, args.idle_seconds, args.rate, args.load_seconds)
        print("start to READY=1, demo flow:")
        ready = run_ready(runnel, tmp)
    except SetupError as e:
        print(f"footprint: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"footprint: interrupted ({e or 'SIGINT'}); runnel stopped", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    over = []

    def verdict(name, ok):
        if not ok:
            over.append(name)
        return "OK" if ok else "OVER"

    x86_size = os.path.getsize(runnel)
    ready_median = statistics.median(ready)
    idle_s = f"{args.idle_seconds:g} s"
    rows = [
        [f"idle VmRSS, demo flow loaded and finished ({idle_s} after READY)", kib(demo["VmRSS"]),
         f"<= {kib(IDLE_BUDGET_KIB)}", verdict("idle", demo["VmRSS"] <= IDLE_BUDGET_KIB)],
        [f"idle VmRSS, FIFO flow open and silent ({idle_s} after READY)", kib(fifo["VmRSS"]), "-", "info"],
        [f"idle VmRSS, no flows ({idle_s} after READY)", kib(none["VmRSS"]), "-", "info"],
        [f"VmRSS under {args.rate:,} readings/s for {args.load_seconds:g} s, max (last {last['VmRSS']:,}, VmHWM {load_hwm:,} KiB)",
         kib(peak["VmRSS"]), f"<= {kib(LOAD_BUDGET_KIB)}", verdict("load", peak["VmRSS"] <= LOAD_BUDGET_KIB)],
        [f"spawn to READY=1, median of {len(ready)} ({', '.join(f'{t:.3f}' for t in ready)} s)",
         f"{ready_median:.3f} s", f"<= {READY_BUDGET_S} s", verdict("ready", ready_median <= READY_BUDGET_S)],
        [f"binary size, {platform.machine()} ({Path(runnel).name})",
         f"{x86_size:,} B ({x86_size / KIB / KIB:.2f} MiB)", "-", "info"],
    ]
    if aarch64:
        size = os.path.getsize(aarch64)
        rows.append([f"binary size, aarch64 ({Path(aarch64).name})", f"{size:,} B ({size / KIB / KIB:.2f} MiB)",
                     f"< {AARCH64_BUDGET_BYTES:,} B", verdict("aarch64", size < AARCH64_BUDGET_BYTES)])
    else:
        rows.append(["binary size, aarch64", "not built (cross/build)", f"< {AARCH64_BUDGET_BYTES:,} B", "skipped"])

    procs = [("demo, idle", demo), ("FIFO flow, idle", fifo), ("no flows, idle", none),
             ("under load, at max VmRSS", peak), ("under load, last sample", last),
             ("after EOF (windows flushed)", after_eof)]
    prow = [[name, *(f"{s[k]:,}" for k in STATUS_FIELDS)] for name, s in procs]

    print()
    if args.markdown:
        print(f"*{version}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; "
              f"`python3 tests/bench/footprint.py --markdown`; load writer reached {achieved:,.0f}/s.*")
        print()
    table(["measure", "value", "budget", "verdict"], rows, args.markdown, right=(1, 2))
    print()
    table(["process (/proc/PID/status)", "VmRSS KiB", "VmHWM KiB", "RssAnon KiB", "RssFile KiB", "Threads"],
          prow, args.markdown, right=(1, 2, 3, 4, 5))
    if over:
        print(f"\nover budget: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
