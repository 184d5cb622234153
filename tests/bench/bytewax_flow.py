"""Benchmark contender: Bytewax 0.21.1 (see bench.py).

Mean temperature per sensor in 10 s tumbling event-time windows, written the
way a Bytewax user would: FileSource -> json.loads -> key_on -> fold_window
(EventClock on "ts", TumblingWindower) -> FileSink.

Run by bench.py as

    RUNNEL_BENCH_DATA=readings.jsonl RUNNEL_BENCH_OUT=out.jsonl \
        python -m bytewax.run tests/bench/bytewax_flow.py

(one worker, one process: bytewax.run's default). Each output line is
`[sensor, [window_id, mean]]`, the same as the other contenders.

Keep WINDOW, WAIT and ALIGN_TO in sync with bench.py and the other flows.
"""

import json
import os
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow

DATA = os.environ["RUNNEL_BENCH_DATA"]
OUT = os.environ["RUNNEL_BENCH_OUT"]

WINDOW = timedelta(seconds=10)
WAIT = timedelta(seconds=5)
ALIGN_TO = datetime(2024, 1, 1, tzinfo=timezone.utc)


def event_time(reading):
    return datetime.fromtimestamp(reading["ts"], tz=timezone.utc)


def event_time_iso(reading):  # ISO 8601 text with an offset: an aware datetime
    return datetime.fromisoformat(reading["ts"]).astimezone(timezone.utc)  # Bytewax wants UTC


def builder():
    return (0.0, 0)


def folder(acc, reading):
    return (acc[0] + reading["temp"], acc[1] + 1)


def merger(a, b):
    return (a[0] + b[0], a[1] + b[1])


def to_line(key_wid_acc):
    key, (window_id, (total, count)) = key_wid_acc
    return key, json.dumps([key, [window_id, total / count]])


flow = Dataflow("bench")
lines = op.input("in", flow, FileSource(DATA))
readings = op.map("parse", lines, json.loads)
keyed = op.key_on("by_sensor", readings, lambda r: r["sensor"])
# bench.py's workloads have "ts" as epoch seconds or as ISO 8601 text with an offset.
ISO = os.environ.get("RUNNEL_BENCH_TS") == "iso"
clock = win.EventClock(event_time_iso if ISO else event_time, wait_for_system_duration=WAIT)
windower = win.TumblingWindower(length=WINDOW, align_to=ALIGN_TO)
out = win.fold_window("mean", keyed, clock, windower, builder, folder, merger)
op.output("out", op.map("fmt", out.down, to_line), FileSink(OUT))
