"""Oracle flow: win.aggregate with every statistic over tumbling windows.

Native fast paths only: field key, field clock (epoch seconds).
"""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
ALL_STATS = ["count", "sum", "mean", "min", "max", "stddev", "first", "last", "p50", "p90", "p99"]

flow = Dataflow("oracle_aggregate_tumbling")
readings = op.input("in", flow, sources.file("data.jsonl"))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=10), unit="s")
stats = win.aggregate(
    "stats", keyed, clock,
    win.TumblingWindower(length=timedelta(seconds=10), align_to=ALIGN),
    {"temp": ALL_STATS, "rh": ["last", "count", "mean", "first"]},
)
op.output("down", stats.down, sinks.stdout())
op.output("late", stats.late, sinks.stdout())
op.output("meta", stats.meta, sinks.stdout())
