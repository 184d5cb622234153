"""Benchmark contender: Pathway 0.33 (see bench.py).

Mean temperature per sensor in 10 s tumbling event-time windows, written the
way a Pathway user would: pw.io.jsonlines.read (static mode) -> event time in
integer milliseconds -> windowby(tumbling, instance=sensor) -> reducers.avg
-> pw.io.jsonlines.write -> pw.run().

Run by bench.py as

    RUNNEL_BENCH_DATA=readings.jsonl RUNNEL_BENCH_OUT=out.jsonl RUNNEL_BENCH_TS=s \
        python tests/bench/pathway_flow.py

(one process, one worker thread: Pathway's default without `pathway spawn`
or PATHWAY_THREADS). RUNNEL_BENCH_TS says what "ts" holds: "s" for epoch
seconds as a number (1704067200.051), "iso" for ISO 8601 text with an offset
("2024-01-01T01:00:01.202+01:00"), parsed by Pathway's own strptime.

Each output line is a JSON object
`{"sensor": .., "wid": .., "mean": .., "diff": 1, "time": ..}`; "diff" and
"time" are what pw.io.jsonlines.write adds to every row of its change stream
(a static run only inserts, so every diff is 1).

Static mode reads the whole file and then computes, so there is no watermark
and no late data: every reading counts, and bench.py checks this contender
against the means of all readings, not against Bytewax's.

Keep WINDOW and ALIGN_TO in sync with bench.py and the other flows.
"""

import os

import pathway as pw

DATA = os.environ["RUNNEL_BENCH_DATA"]
OUT = os.environ["RUNNEL_BENCH_OUT"]
TS = os.environ.get("RUNNEL_BENCH_TS", "s")

WINDOW_MS = 10_000
ALIGN_TO_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
# Pathway drops rows that fall before a window's origin, and late readings can
# be from before 2024-01-01. So start the same grid of windows at the epoch
# (the default origin for ints); window ids stay relative to ALIGN_TO.
ORIGIN_MS = ALIGN_TO_MS % WINDOW_MS

ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%f%z"  # %z: a UTC-aware DateTimeUtc


class Reading(pw.Schema):
    # Only the columns the job needs: the JSON parser ignores the other fields.
    sensor: str
    ts: float if TS == "s" else str
    temp: float


readings = pw.io.jsonlines.read(DATA, schema=Reading, mode="static")

# Event time as integer milliseconds, so that window assignment is exact
# (1704067209.999 s must stay in window 0). Both conversions give a float,
# and dt.timestamp's can be a hair off the whole number (it divides
# nanoseconds: 1704067201201.9998 for ...01.202), so round before the cast,
# which truncates.
if TS == "s":
    ms = readings.ts * 1000
else:
    ms = readings.ts.dt.strptime(ISO_FORMAT).dt.timestamp(unit="ms")
readings = readings.select(pw.this.sensor, pw.this.temp, ms=pw.cast(int, ms.num.round()))

means = readings.windowby(
    readings.ms,
    window=pw.temporal.tumbling(duration=WINDOW_MS, origin=ORIGIN_MS),
    instance=readings.sensor,
).reduce(
    sensor=pw.this._pw_instance,
    wid=(pw.this._pw_window_start - ALIGN_TO_MS) // WINDOW_MS,
    mean=pw.reducers.avg(pw.this.temp),
)

pw.io.jsonlines.write(means, OUT)
pw.run(monitoring_level=pw.MonitoringLevel.NONE)
