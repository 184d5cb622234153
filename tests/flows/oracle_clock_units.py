"""Oracle flow: native field clocks in "ms" and "iso8601" units (with
"+02:00" offsets and "Z"), and a field key, feeding aggregate and
reduce_window."""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
WAIT = timedelta(seconds=10)
PLUS2 = timezone(timedelta(hours=2))


def with_times(r):
    """Add ts_ms (int milliseconds) and at (ISO 8601 text) when ts is a number."""
    if not isinstance(r, dict):
        return r
    ts = r.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        r = dict(r)
        r["ts_ms"] = int(ts * 1000)  # ts is a multiple of 1/8 s: exact
        dt = datetime.fromtimestamp(ts, tz=timezone.utc)
        if r.get("seq", 0) % 2:
            r["at"] = dt.astimezone(PLUS2).isoformat()
        else:
            r["at"] = dt.isoformat().replace("+00:00", "Z")
    return r


flow = Dataflow("oracle_clock_units")
readings = op.map("with_times", op.input("in", flow, sources.file("data.jsonl")), with_times)
keyed = op.key_on("by_sensor", readings, "sensor")

ms = win.aggregate("ms", keyed, win.EventClock("ts_ms", WAIT, unit="ms"),
                   win.TumblingWindower(timedelta(seconds=15), ALIGN),
                   {"temp": ["count", "mean", "first", "last"], "ts_ms": ["min", "max"]})
op.output("ms_down", ms.down, sinks.stdout())
op.output("ms_late", ms.late, sinks.stdout())
op.output("ms_meta", ms.meta, sinks.stdout())

seqs = win.reduce_window("iso", op.map_value("seq_list", keyed, lambda r: {"at": r.get("at"), "seqs": [r.get("seq")]}),
                         win.EventClock("at", WAIT, unit="iso8601"),
                         win.SlidingWindower(timedelta(seconds=30), timedelta(seconds=10), ALIGN),
                         lambda a, b: {"at": a["at"], "seqs": sorted(a["seqs"] + b["seqs"])})
op.output("iso_down", op.map_value("just_seqs", seqs.down, lambda wv: (wv[0], wv[1]["seqs"])), sinks.stdout())
op.output("iso_late", seqs.late, sinks.stdout())
op.output("iso_meta", seqs.meta, sinks.stdout())
