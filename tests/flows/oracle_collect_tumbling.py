"""Oracle flow: tumbling windows with collect_window (list in timestamp
order, and dict), count_window with a Python key function, and max_window /
min_window on tuples."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
WAIT = timedelta(seconds=10)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def usable(r):
    """A reading with a sensor runnel can key on and a numeric ts."""
    if not isinstance(r, dict):
        return False
    s = r.get("sensor")
    sensor_ok = isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool))
    return sensor_ok and _number(r.get("ts"))


def sensor_key(r):
    s = r["sensor"]
    return s if isinstance(s, str) else str(s)


def at(ts):
    return datetime.fromtimestamp(ts, tz=timezone.utc)


flow = Dataflow("oracle_collect_tumbling")
readings = op.input("in", flow, sources.file("data.jsonl"))
tumbling = win.TumblingWindower(length=timedelta(seconds=10), align_to=ALIGN)

# Lists of whole readings in timestamp order (ties: arrival order); native
# field key and field clock.
keyed = op.key_on("by_sensor", readings, "sensor")
lists = win.collect_window("list", keyed, win.EventClock("ts", WAIT), tumbling)
op.output("list_down", lists.down, sinks.stdout())
op.output("list_late", lists.late, sinks.stdout())
op.output("list_meta", lists.meta, sinks.stdout())

# Counts with a Python key function and a Python ts_getter.
good = op.filter("usable", readings, usable)
counts = win.count_window("count", good, win.EventClock(lambda r: at(r["ts"]), WAIT), tumbling, sensor_key)
op.output("count_down", counts.down, sinks.stdout())
op.output("count_late", counts.late, sinks.stdout())
op.output("count_meta", counts.meta, sinks.stdout())

# Dicts seq -> temp: collect_window(into=dict) needs (key, value) values.
by_sensor = op.key_on("by_sensor_fn", good, sensor_key)
kv = op.map_value("kv", by_sensor, lambda r: (r["seq"], (r.get("temp"), at(r["ts"]))))
dicts = win.collect_window("dict", kv, win.EventClock(lambda p: p[1][1], WAIT), tumbling, into=dict)
op.output("dict_down", dicts.down, sinks.stdout())
op.output("dict_late", dicts.late, sinks.stdout())

# max/min of (temp, seq, time) tuples: unique, so fold order cannot matter.
with_temp = op.filter_value("with_temp", by_sensor, lambda r: _number(r.get("temp")))
tuples = op.map_value("temp_seq", with_temp, lambda r: (r["temp"], r["seq"], at(r["ts"])))
tclock = win.EventClock(lambda v: v[2], WAIT)
hi = win.max_window("max", tuples, tclock, tumbling)
lo = win.min_window("min", tuples, tclock, tumbling)
op.output("max_down", hi.down, sinks.stdout())
op.output("max_late", hi.late, sinks.stdout())
op.output("min_down", lo.down, sinks.stdout())
op.output("min_meta", lo.meta, sinks.stdout())
