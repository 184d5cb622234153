"""Oracle flow: stateless operators (map, filter, filter_map, flat_map,
flat_map_batch, branch, merge, key_rm, map_value, filter_value,
flat_map_value, inspect), stateful_map and collect, then a tumbling
count window over the re-merged stream."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)


def sensor_of(r):
    if not isinstance(r, dict):
        return None
    s = r.get("sensor")
    if isinstance(s, str):
        return s
    if isinstance(s, int) and not isinstance(s, bool):
        return str(s)
    return None


def reading_or_none(r):
    """Readings with a sensor and a numeric ts, with the sensor as str."""
    s = sensor_of(r)
    ts = r.get("ts") if isinstance(r, dict) else None
    if s is None or isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return None
    return dict(r, sensor=s)


def running_count(count, r):
    count = (count or 0) + 1
    return count, (count, r["seq"])


flow = Dataflow("oracle_stateless")
raw = op.input("in", flow, sources.file("data.jsonl"))
raw = op.inspect("peek", raw, lambda step_id, item: None)
readings = op.filter_map("readings", raw, reading_or_none)
readings = op.filter("not_seq_13", readings, lambda r: r["seq"] != 13)
readings = op.map("tag", readings, lambda r: dict(r, tagged=True))

# Split by sensor (so every sensor's items stay in order), then merge back.
parts = op.branch("split", readings, lambda r: r["sensor"] in ("s0", "s2", "7"))
evens = op.map("even_side", parts.trues, lambda r: dict(r, side="a"))
odds = op.map("odd_side", parts.falses, lambda r: dict(r, side="b"))
merged = op.merge("merge", evens, odds)
op.output("sides", op.map("side_of", merged, lambda r: [r["seq"], r["side"]]), sinks.stdout())

# flat_map: a reading with rh becomes two items.
fields = op.flat_map("fields", merged, lambda r: [[r["seq"], "temp", r.get("temp")]]
                     + ([[r["seq"], "rh", r["rh"]]] if "rh" in r else []))
op.output("fields_out", fields, sinks.stdout())
batched = op.flat_map_batch("batched", merged, lambda rs: [r["seq"] * 10 for r in rs if r["seq"] % 3 == 0])
op.output("batched_out", batched, sinks.stdout())

keyed = op.key_on("by_sensor", merged, lambda r: r["sensor"])
counted = op.stateful_map("running_count", keyed, running_count)
op.output("running_count_out", counted, sinks.stdout())

temps = op.filter_value("numeric", keyed, lambda r: isinstance(r.get("temp"), (int, float)) and not isinstance(r.get("temp"), bool))
fahrenheit = op.map_value("to_f", temps, lambda r: round(r["temp"] * 9 / 5 + 32, 6))
digits = op.flat_map_value("digits", fahrenheit, lambda f: [int(f) // 10, int(f) % 10])
op.output("digits_out", op.key_rm("unkey", digits), sinks.stdout())

batches = op.collect("batches", op.map_value("seq_only", keyed, lambda r: r["seq"]), timedelta(seconds=30), max_size=3)
op.output("batches_out", batches, sinks.stdout())

# A tumbling count window over the merged stream (per-sensor order kept).
counts = win.count_window("count", merged, win.EventClock("ts", timedelta(seconds=10)),
                          win.TumblingWindower(timedelta(seconds=20), ALIGN), "sensor")
op.output("down", counts.down, sinks.stdout())
op.output("late", counts.late, sinks.stdout())
op.output("meta", counts.meta, sinks.stdout())
