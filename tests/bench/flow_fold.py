"""Benchmark contender: runnel running a user's Python window fold (see bench.py).

The same job as bytewax_flow.py, written as a Bytewax user would port it:
the key and the event timestamp come from Python lambdas (not runnel's
field-name fast path), and fold_window's builder/folder/merger are Python
functions accumulating (sum, count); a map_value turns that into the mean.

Run by bench.py as

    RUNNEL_BENCH_OUT=out.jsonl runnel replay tests/bench/flow_fold.py \
        --input in=readings.jsonl --keep-sinks

Each output line is `[sensor, [window_id, mean]]`.
Keep WINDOW, WAIT and ALIGN_TO in sync with bench.py and the other flows.
"""

import os
from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

OUT = os.environ.get("RUNNEL_BENCH_OUT", "bench_fold_out.jsonl")

WINDOW = timedelta(seconds=10)
WAIT = timedelta(seconds=5)
ALIGN_TO = datetime(2024, 1, 1, tzinfo=timezone.utc)


def builder():
    return (0.0, 0)


def folder(acc, reading):
    return (acc[0] + reading["temp"], acc[1] + 1)


def merger(a, b):
    return (a[0] + b[0], a[1] + b[1])


def to_mean(wid_acc):
    window_id, (total, count) = wid_acc
    return (window_id, total / count)


flow = Dataflow("bench_fold")
readings = op.input("in", flow, sources.file("readings.jsonl"))  # replaced by --input in=...
keyed = op.key_on("by_sensor", readings, lambda r: r["sensor"])
# bench.py's workloads have "ts" as epoch seconds or as ISO 8601 text with an offset.
if os.environ.get("RUNNEL_BENCH_TS") == "iso":
    clock = win.EventClock(lambda r: datetime.fromisoformat(r["ts"]).astimezone(timezone.utc), wait_for_system_duration=WAIT)
else:
    clock = win.EventClock(lambda r: datetime.fromtimestamp(r["ts"], tz=timezone.utc),
                           wait_for_system_duration=WAIT)
windower = win.TumblingWindower(WINDOW, ALIGN_TO)
out = win.fold_window("mean", keyed, clock, windower, builder, folder, merger)
op.output("out", op.map_value("to_mean", out.down, to_mean), sinks.file(OUT))
