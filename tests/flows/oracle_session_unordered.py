"""Oracle flow: session windows with unordered window operators, where
out-of-order items make sessions merge: count_window (field key),
reduce_window, max_window, min_window, collect_window(set, ordered=False)
and fold_window(ordered=False). Every result is independent of the order
values are folded and merged in."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win


def numeric_temp(r):
    t = r.get("temp")
    return isinstance(t, (int, float)) and not isinstance(t, bool)


flow = Dataflow("oracle_session_unordered")
readings = op.input("in", flow, sources.file("data.jsonl"))
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=10), unit="s")
sessions = win.SessionWindower(gap=timedelta(seconds=4))

counts = win.count_window("count", readings, clock, sessions, "sensor")
op.output("count_down", counts.down, sinks.stdout())
op.output("count_late", counts.late, sinks.stdout())
op.output("count_meta", counts.meta, sinks.stdout())

keyed = op.key_on("by_sensor", readings, "sensor")
with_temp = op.filter_value("with_temp", keyed, numeric_temp)

# Sum of integer tenths of a degree: exact, so the order of additions
# (which merges change) cannot matter.
tenths = op.map_value("tenths", with_temp, lambda r: {"ts": r.get("ts"), "t10": round(r["temp"] * 10)})
sums = win.reduce_window("sum", tenths, clock, sessions,
                         lambda a, b: {"ts": min(a["ts"], b["ts"]), "t10": a["t10"] + b["t10"]})
op.output("sum_down", sums.down, sinks.stdout())
op.output("sum_late", sums.late, sinks.stdout())
op.output("sum_meta", sums.meta, sinks.stdout())

# `seq` breaks ties, so the max and min are unique.
hottest = win.max_window("hottest", with_temp, clock, sessions, by=lambda r: (r["temp"], r["seq"]))
op.output("max_down", hottest.down, sinks.stdout())
coldest = win.min_window("coldest", with_temp, clock, sessions, by=lambda r: (r["temp"], r["seq"]))
op.output("min_down", coldest.down, sinks.stdout())
op.output("min_meta", coldest.meta, sinks.stdout())

# Sets of (ts, seq) tuples, clocked by a Python ts_getter reading the tuple.
def ts_seq(r):
    ts = r.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return (ts, r.get("seq"))
    return None


pairs = op.filter_value("has_ts", op.map_value("ts_seq", keyed, ts_seq), lambda p: p is not None)
pair_clock = win.EventClock(lambda p: datetime.fromtimestamp(p[0], tz=timezone.utc),
                            wait_for_system_duration=timedelta(seconds=10))
seq_sets = win.collect_window("seq_set", pairs, pair_clock, sessions, into=set, ordered=False)
op.output("set_down", seq_sets.down, sinks.stdout())
op.output("set_meta", seq_sets.meta, sinks.stdout())

# Unordered fold: count and exact tenths sum per session, merged by addition.
folded = win.fold_window(
    "fold", tenths, clock, sessions,
    builder=lambda: [0, 0],
    folder=lambda acc, v: [acc[0] + 1, acc[1] + v["t10"]],
    merger=lambda a, b: [a[0] + b[0], a[1] + b[1]],
    ordered=False,
)
op.output("fold_down", folded.down, sinks.stdout())
op.output("fold_late", folded.late, sinks.stdout())
op.output("fold_meta", folded.meta, sinks.stdout())
