"""Benchmark contender: runnel's native window aggregate (see bench.py).

The same job as bytewax_flow.py on runnel's fast path: key and event time are
field names read in Rust, and win.aggregate computes the mean in Rust, so no
Python runs per item.

Run by bench.py as

    RUNNEL_BENCH_OUT=out.jsonl runnel replay tests/bench/flow_aggregate.py \
        --input in=readings.jsonl --keep-sinks

Each output line is `[sensor, [window_id, {"temp": {"mean": mean}}]]`.
Keep WINDOW, WAIT and ALIGN_TO in sync with bench.py and the other flows.
"""

import os
from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

OUT = os.environ.get("RUNNEL_BENCH_OUT", "bench_aggregate_out.jsonl")

WINDOW = timedelta(seconds=10)
WAIT = timedelta(seconds=5)
ALIGN_TO = datetime(2024, 1, 1, tzinfo=timezone.utc)

flow = Dataflow("bench_aggregate")
readings = op.input("in", flow, sources.file("readings.jsonl"))  # replaced by --input in=...
keyed = op.key_on("by_sensor", readings, "sensor")
# bench.py's workloads have "ts" as epoch seconds or as ISO 8601 text with an offset.
UNIT = "iso8601" if os.environ.get("RUNNEL_BENCH_TS") == "iso" else "s"
clock = win.EventClock("ts", wait_for_system_duration=WAIT, unit=UNIT)
windower = win.TumblingWindower(WINDOW, ALIGN_TO)
out = win.aggregate("mean", keyed, clock, windower, {"temp": ["mean"]})
op.output("out", out.down, sinks.file(OUT))
