"""The bundled demo: a greenhouse with four sensors.

Run it with `runnel demo` (it replays captures/greenhouse.jsonl), or
`runnel replay flows/demo.py`. Per sensor and minute it computes temperature
and humidity statistics in Rust (`win.aggregate`), and, in Python, flags
readings above 30 °C.
"""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

flow = Dataflow("greenhouse")

readings = op.input("readings", flow, sources.file("captures/greenhouse.jsonl"))
by_sensor = op.key_on("by_sensor", readings, "sensor")

# Event time from the "ts" field (Unix seconds); wait 10 s for stragglers.
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=10), unit="s")
minutes = win.TumblingWindower(length=timedelta(minutes=1), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))

stats = win.aggregate(
    "per_minute",
    by_sensor,
    clock,
    minutes,
    {"temp": ["count", "mean", "min", "max", "p90"], "rh": ["mean"]},
)
op.output("summary", stats.down, sinks.stdout())
op.output("late", stats.late, sinks.stdout())


def too_hot(reading):
    return isinstance(reading.get("temp"), (int, float)) and reading["temp"] > 30.0


def alert(reading):
    return f"{reading['temp']:.1f} °C at {reading['ts']}"


alerts = op.map_value("describe", op.filter_value("too_hot", by_sensor, too_hot), alert)
op.output("alerts", alerts, sinks.stdout())
