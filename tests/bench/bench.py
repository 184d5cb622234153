#!/usr/bin/env python3
"""Benchmark: runnel vs Bytewax 0.21.1, Pathway, a plain Python loop and a hand-written Rust loop.

What it measures
----------------
One job, six contenders, five workloads; each contender runs as a child
process, one after the other, in the same run:

    mean temperature per sensor in 10 s tumbling event-time windows
    (EventClock on "ts", wait_for_system_duration 5 s), output to a file.

    runnel-aggregate  runnel replay flow_aggregate.py: key, clock and mean all
                      in Rust (field-name key_on/EventClock + win.aggregate)
    runnel-fold       runnel replay flow_fold.py: a user's Python flow, with
                      Python lambdas for key and timestamp and a Python
                      fold_window builder/folder/merger of (sum, count)
    bytewax           python -m bytewax.run bytewax_flow.py (Bytewax 0.21.1,
                      its default single worker)
    pathway           pathway_flow.py: jsonlines in static mode, windowby
                      tumbling, avg (no event-time lateness)
    python            plain_python.py: a hand-written loop, json.loads + dicts
    limit             tests/bench/limit (bench-limit): serde_json into a struct,
                      a hash map of sums, no watermarks: the practical limit

The workloads (WORKLOADS below) are N JSON lines each (default 1,000,000):
basic (3 fields, 100 sensors, near order, the first benchmark's), wide (9
fields with strings, a nested object and a list; readings 60 ms apart with
+-300 ms of jitter; 0.5 % late by 15-40 s), iso (wide with ISO 8601 times with
offsets), keys-10k and keys-100k (wide, that many sensors over ten minutes).
Each is generated once and cached in the work dir (default
$TMPDIR/runnel-bench) together with two references: the mean of every window
under Bytewax's rule (per-key watermark, late readings dropped) and of all
readings (for pathway and limit, which have no lateness). Every contender's
output is checked against its reference (window count, duplicates, means).

For each contender: wall time (time.monotonic around os.wait4), events/s
(N / wall, so process start-up and imports count), and peak RSS (ru_maxrss of
the contender process from os.wait4; on Linux it is started through a tiny
/bin/sh and re-parented to bench.py, so the kernel doesn't fold bench.py's
own RSS into it, see become_subreaper), plus ratios to Bytewax and to the
limit. On a busy machine the numbers are noisy, so use --repeat to keep the best.

How to run
----------
    # a Python with Bytewax 0.21.1 and Pathway, once:
    python3 -m venv .venv-bench && .venv-bench/bin/pip install bytewax==0.21.1 pathway
    # the runnel binary and the limit:
    cargo build --release -p runnel -p bench-limit
    # then, from the repo root:
    python3 tests/bench/bench.py --bytewax-python .venv-bench/bin/python
    python3 tests/bench/bench.py --markdown --repeat 3 --workloads basic,wide,iso
    python3 tests/bench/bench.py --n 100000 --workloads wide --only aggregate,bw,rust   # quick

Options: --runnel (default <repo>/target/release/runnel), --limit (default
<repo>/target/release/bench-limit), --bytewax-python (default
$RUNNEL_BYTEWAX_PYTHON, else <repo>/.venv-test or .venv-bench), --n,
--workloads, --only, --repeat, --workdir, --timeout, --keep-outputs,
--markdown. Standard library only.

Exit status: 0 when every selected contender ran (sanity warnings are shown
in the table's "check" column but don't fail the run), 1 when one couldn't be
started, exited non-zero or timed out, 2 on bad arguments.
"""

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The job. Keep in sync with flow_aggregate.py, flow_fold.py, bytewax_flow.py
# and plain_python.py (which can't import this module).
WINDOW_S = 10.0
WAIT_S = 5.0
ALIGN_TO = 1704067200.0  # 2024-01-01T00:00:00Z: event time starts here

CONTENDERS = ("runnel-aggregate", "runnel-fold", "bytewax", "pathway", "python", "limit")
ALIASES = {"aggregate": "runnel-aggregate", "fold": "runnel-fold",
           "bw": "bytewax", "pw": "pathway", "plain": "python", "rust": "limit"}
# Contenders without event-time watermarks: checked against every reading.
NO_WATERMARKS = ("pathway", "limit")
BYTEWAX_VERSION = "0.21.1"
VENV_HINT = ("python3 -m venv .venv-bench && .venv-bench/bin/pip install "
             f"bytewax=={BYTEWAX_VERSION} pathway")

# The data: one generator, five workloads (see WORKLOADS). Every workload
# has 1,000,000 readings by default (--n), in file order by nominal time.
SEED = 42
DATA_VERSION = 2  # bump when the generator changes, to invalidate caches


class Workload:
    def __init__(self, name, what, keys, span_s, jitter_s, late, wide, iso):
        self.name, self.what = name, what
        self.keys = keys
        self.span_s = span_s  # event time the readings cover (None: 100 ms per key per tick)
        self.jitter_s = jitter_s
        self.late = late  # fraction of readings made late by 15-40 s
        self.wide = wide  # nine fields (strings, a nested object, a list) or three
        self.iso = iso  # "ts" as ISO 8601 text with a per-sensor offset, else epoch seconds

    def period(self, n):
        return 0.1 if self.span_s is None else self.span_s * self.keys / n


WORKLOADS = {w.name: w for w in [
    Workload("basic", "3 fields, 100 keys, near order (+-20 ms), no late data (the first benchmark's)",
             100, None, 0.02, 0.0, False, False),
    Workload("wide", "9 fields, 100 keys, readings 60 ms apart +-300 ms, 0.5 % late by 15-40 s",
             100, 600.0, 0.3, 0.005, True, False),
    Workload("iso", "as wide, with ISO 8601 timestamps with offsets",
             100, 600.0, 0.3, 0.005, True, True),
    Workload("keys-10k", "as wide, 10,000 keys over ten minutes",
             10_000, 600.0, 0.3, 0.005, True, False),
    Workload("keys-100k", "as wide, 100,000 keys over ten minutes",
             100_000, 600.0, 0.3, 0.005, True, False),
]}

STATUS = ["ok"] * 17 + ["warn", "low-batt", "recal"]
OFFSETS_MIN = [0, 60, 120, -300, 330, -480, 540]  # UTC offsets of the sensors' clocks


def iso_text(ts, offset_min):
    """ts (epoch seconds, 3 decimals) as local ISO 8601 text with its offset."""
    ms = round(ts * 1000)
    local = datetime.fromtimestamp(ms // 1000, tz=timezone.utc) + timedelta(minutes=offset_min)
    sign, off = ("+" if offset_min >= 0 else "-"), abs(offset_min)
    return f"{local:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}{sign}{off // 60:02d}:{off % 60:02d}"


def generate(w, n, data_path, ref_path):
    """Write n readings of workload w to data_path, and to ref_path the
    expected {"sensor|wid": mean} of every window under Bytewax's rules
    (per-key watermark = largest ts - WAIT, later readings dropped) and,
    for the contenders without watermarks, of all readings."""
    rng = random.Random(SEED)
    width = max(3, len(str(w.keys - 1)))
    names = [f"sensor-{s:0{width}d}" for s in range(w.keys)]
    base = [18.0 + 6.0 * rng.random() for _ in range(w.keys)]
    offsets = [OFFSETS_MIN[s % len(OFFSETS_MIN)] for s in range(w.keys)]
    period = w.period(n)
    kept, every = {}, {}  # (sensor, wid) -> [sum, count]
    max_ts = [-math.inf] * w.keys
    late = 0
    tmp = data_path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for j in range(n):
            tick, s = divmod(j, w.keys)
            nominal = ALIGN_TO + tick * period + period / 2
            if w.span_s is None:  # the first benchmark: never near a window edge
                ts = nominal + rng.uniform(-w.jitter_s, w.jitter_s)
            else:
                ts = nominal + rng.uniform(-w.jitter_s, w.jitter_s)
                if rng.random() < w.late:
                    ts = nominal - rng.uniform(15.0, 40.0)
            ts = round(ts, 3)
            wm = max_ts[s] - WAIT_S
            # Stay clear of the watermark, so that Bytewax's system-time drift
            # (its watermark also moves with the wall clock) can't make a
            # reading late for it and on time for the reference, or back.
            if abs(ts - wm) < 2.0:
                ts = round(wm - 3.0, 3)
            temp = base[s] + 2.0 * math.sin(tick * period / 300.0 + s) + rng.gauss(0.0, 0.3)
            ts_s, temp_s = f"{ts:.3f}", f"{temp:.2f}"
            ts_field = f'"{iso_text(ts, offsets[s])}"' if w.iso else ts_s
            if w.wide:
                hum = 40.0 + 10.0 * rng.random()
                f.write(f'{{"sensor": "{names[s]}", "ts": {ts_field}, "temp": {temp_s}, '
                        f'"hum": {hum:.1f}, "status": "{STATUS[rng.randrange(len(STATUS))]}", '
                        f'"fw": "2.{s % 4}.{s % 7}", '
                        f'"loc": {{"lat": {52.0 + s * 1e-4:.4f}, "lon": {13.0 + s * 1e-4:.4f}}}, '
                        f'"rssi": [{-60 - rng.randrange(20)}, {-60 - rng.randrange(20)}, '
                        f'{-60 - rng.randrange(20)}], "batt": {3.0 + rng.random():.2f}}}\n')
            else:
                f.write(f'{{"sensor": "{names[s]}", "ts": {ts_field}, "temp": {temp_s}}}\n')
            k = (names[s], math.floor((float(ts_s) - ALIGN_TO) / WINDOW_S))
            acc = every.setdefault(k, [0.0, 0])
            acc[0] += float(temp_s)
            acc[1] += 1
            if float(ts_s) < wm:
                late += 1
                continue
            max_ts[s] = max(max_ts[s], float(ts_s))
            acc = kept.setdefault(k, [0.0, 0])
            acc[0] += float(temp_s)
            acc[1] += 1
    ref = {
        "late": late,
        "kept": {f"{k}|{wid}": t / c for (k, wid), (t, c) in kept.items()},
        "all": {f"{k}|{wid}": t / c for (k, wid), (t, c) in every.items()},
    }
    ref_tmp = ref_path.with_suffix(".tmp")
    ref_tmp.write_text(json.dumps(ref))
    os.replace(ref_tmp, ref_path)
    os.replace(tmp, data_path)  # last: a complete data file means a complete cache


def ensure_data(w, n, workdir):
    stem = f"{w.name}-v{DATA_VERSION}-n{n}-seed{SEED}"
    data, ref = workdir / f"{stem}.jsonl", workdir / f"{stem}.ref.json"
    if data.exists() and ref.exists():
        print(f"data: {data} (cached)")
    else:
        t0 = time.monotonic()
        print(f"data: generating {n:,} readings into {data} ...", flush=True)
        generate(w, n, data, ref)
        print(f"data: generated in {time.monotonic() - t0:.1f} s")
    return data, json.loads(ref.read_text())


# ----------------------------------------------------------- contenders ----

class Contender:
    def __init__(self, name, cmd=None, env=None, missing=None):
        self.name = name
        self.cmd = cmd  # argv, or None when it can't run (see missing)
        self.env = env or {}
        self.missing = missing  # why it can't run
        self.runs = []  # (wall_s, maxrss_bytes)
        self.error = None
        self.check = None  # (windows, problems)


def bytewax_python(arg):
    """The interpreter with Bytewax (and Pathway): the flag, the env var, else
    the benchmark's virtualenv (<repo>/.venv-bench, see How to run), else the
    test command's (<repo>/.venv-test, which has no pathway)."""
    if arg:
        return arg
    if os.environ.get("RUNNEL_BYTEWAX_PYTHON"):
        return os.environ["RUNNEL_BYTEWAX_PYTHON"]
    for name in (".venv-bench", ".venv-test"):  # .venv-bench may have pathway too
        venv = REPO / name / "bin" / "python"
        if venv.exists():
            return str(venv)
    return None


def python_has(python, module):
    """The version of `module` in `python`'s environment, or (None, why not)."""
    try:
        r = subprocess.run(
            [python, "-c", f"import importlib.metadata as m; print(m.version({module!r}))"],
            capture_output=True, text=True, timeout=60)
    except OSError as ex:
        return None, f"can't run {python}: {ex}"
    if r.returncode != 0:
        return None, f"{python} has no {module} ({r.stderr.strip().splitlines()[-1:]})"
    return r.stdout.strip(), None


def make_contenders(names, args, w, data, workdir):
    out = {name: workdir / f"out-{w.name}-{name}.jsonl" for name in names}
    ts = "iso" if w.iso else "s"
    result = []
    runnel = Path(args.runnel)
    runnel_missing = None if runnel.is_file() and os.access(runnel, os.X_OK) else (
        f"no runnel binary at {runnel}; build it with `cargo build --release` or pass --runnel")
    limit = Path(args.limit)
    limit_missing = None if limit.is_file() and os.access(limit, os.X_OK) else (
        f"no limit binary at {limit}; build it with `cargo build --release -p bench-limit`")
    py = bytewax_python(args.bytewax_python)
    for name in names:
        env = {"RUNNEL_BENCH_DATA": str(data), "RUNNEL_BENCH_OUT": str(out[name]), "RUNNEL_BENCH_TS": ts}
        if name in ("runnel-aggregate", "runnel-fold"):
            flow = HERE / ("flow_aggregate.py" if name == "runnel-aggregate" else "flow_fold.py")
            c = Contender(name, [str(runnel), "replay", str(flow), "--input", f"in={data}", "--keep-sinks"],
                          env, runnel_missing)
        elif name in ("bytewax", "pathway"):
            missing = None
            if py is None:
                missing = ("no benchmark python: pass --bytewax-python or set RUNNEL_BYTEWAX_PYTHON; "
                           f"to make one: {VENV_HINT}")
            else:
                version, err = python_has(py, name)
                if err:
                    missing = f"{err}; to make one: {VENV_HINT}"
                elif name == "bytewax" and version != BYTEWAX_VERSION:
                    print(f"warning: {py} has bytewax {version}, not {BYTEWAX_VERSION}")
            cmd = ([py or "?", "-m", "bytewax.run", str(HERE / "bytewax_flow.py")] if name == "bytewax"
                   else [py or "?", str(HERE / "pathway_flow.py")])
            c = Contender(name, cmd, env, missing)
        elif name == "limit":
            c = Contender(name, [str(limit), str(data), str(out[name]), ts], None, limit_missing)
        else:
            c = Contender(name, [sys.executable, str(HERE / "plain_python.py"), str(data), str(out[name]), ts])
        c.out = out[name]
        c.log = workdir / f"log-{w.name}-{name}.txt"
        result.append(c)
    return result


def become_subreaper():
    """Make orphaned descendants get re-parented to this process (Linux).

    Needed for honest peak RSS: the kernel carries the *spawning* process's
    RSS high-water mark into the child's ru_maxrss across exec (with fork as
    with vfork/posix_spawn), so a contender started straight from this Python
    process would never report less than this process's own RSS (~15 MiB).
    Instead a tiny /bin/sh starts the contender in the background and exits;
    the contender is re-parented to us and os.wait4 gives its own, clean
    ru_maxrss."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


SUBREAPER = False  # set in main()
LAUNCH = '"$@" >/dev/null & echo $!'  # sh: start the contender, print its pid


def run_once(c, timeout):
    """Run c once; return (wall_s, maxrss_bytes) or raise RuntimeError.

    Wall time is time.monotonic() around the contender's life (spawn to
    os.wait4); peak RSS is ru_maxrss of the contender process from os.wait4.
    """
    c.out.unlink(missing_ok=True)  # runnel's sinks.file appends
    env = dict(os.environ, **c.env)
    with open(c.log, "wb") as log:
        t0 = time.monotonic()
        if SUBREAPER:
            sh = subprocess.Popen(["/bin/sh", "-c", LAUNCH, "sh", *c.cmd], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO)
            pid = int(sh.communicate()[0])
        else:  # ru_maxrss is then at least this process's RSS when it spawned c
            p = subprocess.Popen(c.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=log, env=env, cwd=REPO)
            pid, p.returncode = p.pid, 0  # reaped by os.wait4 below, not by Popen
        killer = threading.Timer(timeout, os.kill, (pid, 9))
        killer.start()
        try:
            _, status, usage = os.wait4(pid, 0)
        except BaseException:  # e.g. Ctrl-C: don't leave the contender running
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise
        finally:
            killer.cancel()
        wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = c.log.read_text(errors="replace").strip().splitlines()[-5:]
        why = f"timed out after {timeout:g} s" if code == -9 and wall >= timeout else f"exit status {code}"
        raise RuntimeError(f"{why}; log {c.log}:\n    " + "\n    ".join(tail))
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return wall, rss


# ---------------------------------------------------------------- check ----

def check_output(path, ref):
    """Compare an output file with the reference means ({"sensor|wid": mean}).
    Returns (windows emitted, list of problems)."""
    if not path.exists():
        return 0, ["no output file"]
    seen, bad, dups, worst = set(), 0, 0, 0.0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if isinstance(item, dict) and "item" in item:  # {"step": .., "item": ..}
                    item = item["item"]
                if isinstance(item, dict):  # pathway: {"sensor", "wid", "mean", "diff", "time"}
                    if item.get("diff", 1) != 1:
                        bad += 1
                        continue
                    key, wid, mean = item["sensor"], item["wid"], item["mean"]
                else:
                    key, (wid, mean) = item
                if isinstance(mean, dict):  # win.aggregate: {"temp": {"mean": ..}}
                    mean = mean["temp"]["mean"]
                k = f"{key}|{wid}"
                if k in seen:
                    dups += 1
                seen.add(k)
                expected = ref.get(k)
                if expected is None:
                    bad += 1
                else:
                    worst = max(worst, abs(mean - expected) / max(abs(expected), 1e-12))
            except (ValueError, TypeError, KeyError):
                bad += 1
    problems = []
    if len(seen) != len(ref):
        problems.append(f"{len(seen)} windows, expected {len(ref)}")
    if dups:
        problems.append(f"{dups} duplicate windows")
    if bad:
        problems.append(f"{bad} unexpected/malformed lines")
    if worst > 1e-9:
        problems.append(f"means off by up to {worst:.1e} (relative)")
    return len(seen) + dups, problems


# ---------------------------------------------------------------- table ----

HEADER = ["workload", "contender", "wall s", "events/s", "peak RSS MiB", "vs Bytewax",
          "time vs limit", "RSS vs Bytewax", "windows", "check"]
LEFT = (0, 1, 9)


def table_rows(w, contenders, n):
    best = {c.name: min(c.runs) for c in contenders if c.runs and not c.error}
    bw, limit = best.get("bytewax"), best.get("limit")
    rows = []
    for c in contenders:
        if c.name not in best:
            rows.append([w.name, c.name] + ["-"] * 7 + ["FAILED (see below)"])
            continue
        wall, rss = best[c.name]
        windows, problems = c.check
        rows.append([
            w.name, c.name, f"{wall:.2f}", f"{n / wall:,.0f}", f"{rss / 2**20:.1f}",
            f"{bw[0] / wall:.2f}x" if bw else "-",
            f"{wall / limit[0]:.2f}x" if limit else "-",
            f"{rss / bw[1]:.2f}x" if bw else "-",
            f"{windows:,}", "; ".join(problems) or "ok",
        ])
    return rows


def print_table(rows, markdown):
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" if j in LEFT else "---:" for j in range(len(HEADER))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows)]
    for i, r in enumerate([HEADER] + rows):
        cells = [x.ljust(wd) if j in LEFT else x.rjust(wd) for j, (x, wd) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * wd for wd in widths))


# ----------------------------------------------------------------- main ----

def parse_only(text):
    names = []
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        if word == "runnel":
            names += ["runnel-aggregate", "runnel-fold"]
            continue
        word = ALIASES.get(word, word)
        if word not in CONTENDERS:
            raise argparse.ArgumentTypeError(
                f"unknown contender {word!r}; choose from {', '.join(CONTENDERS)} "
                "(or aggregate, fold, runnel, bw, pw, plain, rust)")
        names.append(word)
    return [c for c in CONTENDERS if c in names]


def parse_workloads(text):
    names = [w.strip().lower() for w in text.split(",") if w.strip()]
    if names == ["all"]:
        return list(WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            raise argparse.ArgumentTypeError(
                f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} or all")
    return [w for w in WORKLOADS if w in names]


def run_workload(w, args):
    data, ref = ensure_data(w, args.n, args.workdir)
    contenders = make_contenders(args.only, args, w, data, args.workdir)
    kept, every = ref["kept"], ref["all"]
    print(f"workload {w.name}: {w.what}; {args.n:,} readings, {w.keys:,} keys, "
          f"{ref['late']:,} late, {len(kept):,} windows expected ({len(every):,} counting late readings)")
    for c in contenders:
        print(f"  {c.name}: " + (f"SKIPPED ({c.missing})" if c.missing else " ".join(c.cmd)))
        if c.missing:
            c.error = c.missing
    print(flush=True)
    for rep in range(args.repeat):
        for c in contenders:
            if c.error:
                continue
            print(f"{w.name} run {rep + 1}/{args.repeat} {c.name} ...", end=" ", flush=True, file=sys.stderr)
            try:
                wall, rss = run_once(c, args.timeout)
            except (RuntimeError, OSError) as ex:
                c.error = str(ex)
                print(f"FAILED: {ex}", file=sys.stderr)
                continue
            c.runs.append((wall, rss))
            print(f"{wall:.2f} s, {rss / 2**20:.1f} MiB", file=sys.stderr)
            check = check_output(c.out, every if c.name in NO_WATERMARKS else kept)
            if rep == 0:
                c.check = check
            elif check != c.check:  # each repeat must produce the same result
                c.check = (c.check[0], c.check[1] + [f"repeat {rep + 1} differs: {check}"])
            if not args.keep_outputs:
                c.out.unlink(missing_ok=True)
    return contenders


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for details.")
    ap.add_argument("--n", type=int, default=1_000_000, help="readings per workload (default 1,000,000)")
    ap.add_argument("--workloads", type=parse_workloads, default=list(WORKLOADS),
                    help=f"comma-separated, or all (default): {', '.join(WORKLOADS)}")
    ap.add_argument("--runnel", default=str(REPO / "target" / "release" / "runnel"),
                    help="runnel binary (default <repo>/target/release/runnel)")
    ap.add_argument("--limit", default=str(REPO / "target" / "release" / "bench-limit"),
                    help="the hand-written Rust loop (default <repo>/target/release/bench-limit)")
    ap.add_argument("--bytewax-python", default=None,
                    help="python with bytewax==0.21.1 and pathway (default $RUNNEL_BYTEWAX_PYTHON, "
                         "else <repo>/.venv-bench or <repo>/.venv-test)")
    ap.add_argument("--only", type=parse_only, default=list(CONTENDERS),
                    help=f"comma-separated contenders: {', '.join(CONTENDERS)} "
                         "(aliases: aggregate, fold, runnel = both runnel ones, bw, pw, plain, rust)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each contender this many times (interleaved), keep the fastest")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "runnel-bench",
                    help="cache for data, outputs and logs (default $TMPDIR/runnel-bench)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each contender's output file")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()
    if args.n < 1 or args.repeat < 1 or not args.only or not args.workloads:
        ap.error("--n and --repeat must be positive, --only and --workloads must name something")

    global SUBREAPER
    SUBREAPER = become_subreaper()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"job: mean temp per sensor, {WINDOW_S:g} s tumbling event-time windows, "
          f"wait_for_system_duration {WAIT_S:g} s")
    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; plain python: {platform.python_version()}")
    if not SUBREAPER:
        print("note: can't become a child subreaper here; peak RSS includes bench.py's own RSS as a floor")
    print("runnel-fold: key and timestamp via Python lambdas, fold_window builder/folder/merger "
          "in Python (a user's Python flow); runnel-aggregate: field names + win.aggregate, no Python "
          "per item; limit: a hand-written Rust loop (serde_json into a struct, a HashMap of sums, "
          "no watermarks); pathway: windowby tumbling in static mode (no watermarks either); "
          f"{' and '.join(NO_WATERMARKS)} are checked against all readings, the rest against "
          "Bytewax's rule (late readings dropped)")
    print(flush=True)

    results = [(WORKLOADS[name], run_workload(WORKLOADS[name], args)) for name in args.workloads]
    print(file=sys.stderr)

    if args.markdown:
        print(f"*{args.n:,} readings per workload, {WINDOW_S:g} s tumbling windows; "
              f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; "
              f"best of {args.repeat}.*\n")
    print_table([row for w, cs in results for row in table_rows(w, cs, args.n)], args.markdown)

    status = 0
    for w, contenders in results:
        counts = {c.name: c.check[0] for c in contenders
                  if c.check and not c.error and c.name not in NO_WATERMARKS}
        if len(set(counts.values())) > 1:
            print(f"\nWARNING ({w.name}): contenders emitted different numbers of windows: "
                  + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        failed = [c for c in contenders if c.error]
        if failed:
            print(f"\nFAILED to run ({w.name}): {', '.join(c.name for c in failed)}")
            for c in failed:
                print(f"  {c.name}: {c.error}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
