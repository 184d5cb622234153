"""Oracle flow: win.aggregate over session windows, with a Python key
function and a Python ts_getter (fed only items they can read)."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win


def usable(r):
    if not isinstance(r, dict):
        return False
    s, ts = r.get("sensor"), r.get("ts")
    sensor_ok = isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool))
    ts_ok = isinstance(ts, (int, float)) and not isinstance(ts, bool)
    return sensor_ok and ts_ok


def sensor_key(r):
    s = r["sensor"]
    return s if isinstance(s, str) else str(s)


def event_time(r):
    return datetime.fromtimestamp(r["ts"], tz=timezone.utc)


flow = Dataflow("oracle_aggregate_session")
readings = op.input("in", flow, sources.file("data.jsonl"))
usable_readings = op.filter("usable", readings, usable)
keyed = op.key_on("by_sensor", usable_readings, sensor_key)
clock = win.EventClock(event_time, wait_for_system_duration=timedelta(seconds=10))
stats = win.aggregate(
    "stats", keyed, clock, win.SessionWindower(gap=timedelta(seconds=4)),
    {"temp": ["count", "first", "last", "mean", "p50", "p90", "p99", "stddev", "min", "max", "sum"],
     "rh": "mean"},
)
op.output("down", stats.down, sinks.stdout())
op.output("late", stats.late, sinks.stdout())
op.output("meta", stats.meta, sinks.stdout())
