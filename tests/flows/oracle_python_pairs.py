"""Oracle flow: keyed streams whose `(key, value)` 2-tuples are made by
Python steps rather than by `op.key_on`: `op.map` returning tuples, and
`op.filter` / `op.inspect` passing a keyed stream on. In Bytewax a keyed
stream is just a stream of 2-tuples, so these feed `stateful_map`,
`map_value`, `key_rm`, `collect` and a window with a Python clock like any
other keyed stream."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
WAIT = timedelta(seconds=10)


def usable(r):
    """A reading with a sensor runnel can key on and a numeric ts."""
    if not isinstance(r, dict):
        return False
    s, ts = r.get("sensor"), r.get("ts")
    sensor_ok = isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool))
    ts_ok = isinstance(ts, (int, float)) and not isinstance(ts, bool)
    return sensor_ok and ts_ok


def sensor_key(r):
    s = r["sensor"]
    return s if isinstance(s, str) else str(s)


def running_count(count, r):
    count = (count or 0) + 1
    return count, (count, r["seq"])


flow = Dataflow("oracle_python_pairs")
readings = op.input("in", flow, sources.file("data.jsonl"))
good = op.filter("usable", readings, usable)

# op.map builds the (key, value) pairs; stateful_map reads them.
pairs = op.map("pair", good, lambda r: (sensor_key(r), r))
counted = op.stateful_map("running_count", pairs, running_count)
op.output("running_count_out", counted, sinks.stdout())

# op.inspect on a keyed stream, then map_value.
peeked = op.inspect("peek", pairs, lambda step_id, item: None)
seqs = op.map_value("seq_only", peeked, lambda r: r["seq"])
op.output("seq_out", seqs, sinks.stdout())

# op.filter on a keyed stream, then key_rm, then a Python step.
kept = op.filter("keep_all", pairs, lambda kv: True)
unkeyed = op.key_rm("unkey", kept)
op.output("unkeyed_out", op.map("seq_of", unkeyed, lambda r: r["seq"]), sinks.stdout())

# op.filter on a keyed stream, then a window with a Python clock.
windowed_in = op.filter("keep_for_window", pairs, lambda kv: True)
clock = win.EventClock(lambda r: datetime.fromtimestamp(r["ts"], tz=timezone.utc), WAIT)
lists = win.collect_window("list", windowed_in, clock, win.TumblingWindower(timedelta(seconds=10), ALIGN))
op.output("list_down", op.map_value("seqs", lists.down, lambda w: (w[0], [r["seq"] for r in w[1]])), sinks.stdout())
op.output("list_late", lists.late, sinks.stdout())

# op.map builds (key, seq) pairs for collect, whose lists go on to Python.
seq_pairs = op.map("seq_pair", good, lambda r: (sensor_key(r), r["seq"]))
batches = op.collect("batches", seq_pairs, timedelta(seconds=30), max_size=3)
op.output("batches_out", op.map_value("sorted", batches, sorted), sinks.stdout())
