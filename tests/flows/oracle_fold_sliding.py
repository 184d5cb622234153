"""Oracle flow: fold_window (ordered) over sliding windows, with a Python
key function and the native field clock."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)


def has_sensor(r):
    if not isinstance(r, dict):
        return False
    s = r.get("sensor")
    return isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool))


def sensor_key(r):
    s = r["sensor"]
    return s if isinstance(s, str) else str(s)


def new_acc():
    return {"n": 0, "seqs": [], "temps": []}


def fold(acc, r):
    acc["n"] += 1
    acc["seqs"].append(r.get("seq"))
    t = r.get("temp")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        acc["temps"].append(t)
    return acc


def merge(a, b):
    return {"n": a["n"] + b["n"], "seqs": a["seqs"] + b["seqs"], "temps": a["temps"] + b["temps"]}


flow = Dataflow("oracle_fold_sliding")
readings = op.input("in", flow, sources.file("data.jsonl"))
keyed = op.key_on("by_sensor", op.filter("has_sensor", readings, has_sensor), sensor_key)
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=10))
out = win.fold_window(
    "fold", keyed, clock,
    win.SlidingWindower(length=timedelta(seconds=20), offset=timedelta(seconds=5), align_to=ALIGN),
    new_acc, fold, merge,
)
op.output("down", out.down, sinks.stdout())
op.output("late", out.late, sinks.stdout())
op.output("meta", out.meta, sinks.stdout())
