"""Oracle flow: native steps on wide readings (tests/oracle/gen.py --wide),
with nothing but their results going out, so the decoder builds only the
fields the plan reads (key, clock, aggregated fields) and each window step
keys its items itself. One input, two keyed streams: a one-field aggregate
over tumbling windows and a two-field one over sliding windows.
"""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
WAIT = timedelta(seconds=10)

flow = Dataflow("oracle_wide")
readings = op.input("in", flow, sources.file("data.jsonl"))
clock = win.EventClock("ts", wait_for_system_duration=WAIT, unit="s")

one = win.aggregate(
    "one", op.key_on("key_one", readings, "sensor"), clock,
    win.TumblingWindower(length=timedelta(seconds=10), align_to=ALIGN),
    {"temp": ["count", "mean", "min", "max", "first", "last", "p90"]},
)
op.output("one_down", one.down, sinks.stdout())

two = win.aggregate(
    "two", op.key_on("key_two", readings, "sensor"), clock,
    win.SlidingWindower(length=timedelta(seconds=20), offset=timedelta(seconds=10), align_to=ALIGN),
    {"temp": ["mean", "last"], "rh": ["count", "sum"]},
)
op.output("two_down", two.down, sinks.stdout())
