#!/usr/bin/env python3
"""Deterministic sensor readings for the Bytewax oracle tests.

    python3 tests/oracle/gen.py --seed 1 --out /tmp/data.jsonl [--keys 4] [--n 400] [--format jsonl|csv] [--wide] [--iso]

Writes readings like {"sensor": "s3", "ts": 1704067215.375, "temp": 21.5,
"rh": 40.1, "seq": 17} (one per line, or CSV with header
sensor,ts,temp,rh,seq). `seq` is unique per record. The same seed gives the
same bytes (stdlib `random.Random` only).

What the data contains, per sensor key (keys "s0".."s{K-1}" and the int
sensor 7, which runnel keys as "7"):

- event times around 2024-01-01T00:00Z, as ints or floats that are
  multiples of 1/8 s (exact in binary, so every reading of them agrees to
  the microsecond); steps of 0.5-3 s, repeated timestamps (ties), and gaps
  of 15-60 s, so session windows (gap 4 s) split, and, as items arrive out
  of order, sessions first open apart and then merge;
- arrival disorder below 5 s: an item arrives after items whose timestamps
  are at most 4.875 s later than its own;
- late items, at least 30 s behind the key's largest timestamp so far;
- readings without "temp", with null, "n/a", (jsonl) true or integer temps,
  and without "rh";
- junk: records without a usable sensor, without or with an unreadable
  "ts", (jsonl) non-object JSON values, malformed lines and blank lines;
  (csv) rows with the wrong number of cells.

--wide (jsonl) gives every record more fields, as real devices send them:
short strings (some with JSON escapes or non-ASCII text), a nested object,
a small list, null, a deeper nesting now and then, some before "sensor" and
"ts". --iso writes every numeric "ts" as ISO 8601 text with the sensor's UTC
offset (Z, +00:00, +01:00, -05:00, +05:30), with or without a fraction.

Watermark margins. The oracle flows use EventClock(wait_for_system_duration
=10 s). runnel's watermark comes from the data only, while Bytewax's also
creeps forward with system time during a run, so no item may be within 2 s
of the late/not-late boundary. Guaranteed per sensor key, for both streams
a flow may window: all readings with a sensor and a readable ts, and those
of them whose "temp" is a number. (A stream filtered on anything else, or
keyed on anything but the sensor, or merged from parts that split a key,
gets no guarantee.)
"""

import argparse
import csv
import json
import random
import sys

BASE = 1704067200  # 2024-01-01T00:00:00Z
WAIT = 10.0  # the flows' wait_for_system_duration
MARGIN = 2.0  # minimum distance of any item from the late boundary
EIGHTH = 0.125


def _ts_value(rng, t):
    """int when whole (half the time), else float (a multiple of 1/8)."""
    if t == int(t) and rng.random() < 0.5:
        return int(t)
    return float(t)


def _numeric(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def generate(seed, n_keys, n, fmt):
    rng = random.Random(seed)
    keys = [f"s{i}" for i in range(n_keys)] + [7]
    clock = {k: BASE + rng.randrange(0, 80) * EIGHTH for k in keys}
    walk = {k: 18.0 + 1.5 * i for i, k in enumerate(keys)}

    def temp_for(k):
        walk[k] = min(35.0, max(5.0, walk[k] + rng.randrange(-8, 9) / 10))
        r = rng.random()
        if r < 0.05:
            return "missing"
        if r < 0.08:
            return "n/a"
        if r < 0.10:
            return None
        if r < 0.11 and fmt == "jsonl":
            return True
        if r < 0.20:
            return int(round(walk[k]))
        return round(walk[k], 1)

    def reading(k, t):
        rec = {"sensor": k, "ts": _ts_value(rng, t)}
        temp = temp_for(k)
        if temp != "missing":
            rec["temp"] = temp
        if rng.random() >= 0.05:
            rec["rh"] = round(30 + rng.random() * 30, 1)
        return rec

    # 1. Regular readings with an arrival time = event time + jitter in
    #    [0, 4.875] s. Sorting by arrival makes every item arrive after
    #    items at most 4.875 s later than itself: never late, and >= 5.125 s
    #    from the boundary (max - 10 s) under any subset of the items.
    regular = []
    for i in range(n):
        k = rng.choice(keys)
        r = rng.random()
        if r < 0.07:
            clock[k] += rng.randrange(15 * 8, 60 * 8) * EIGHTH  # gap: sessions split
        elif r < 0.13:
            pass  # same timestamp as the previous reading of k: a tie
        else:
            clock[k] += rng.randrange(4, 25) * EIGHTH  # 0.5 .. 3 s
        t = clock[k]
        arrival = t + rng.randrange(0, 40) * EIGHTH
        regular.append((arrival, i, k, t))
    regular.sort()

    # 2. Walk in arrival order, adding late items and junk.
    records = []
    max_all = {}
    max_temp = {}

    def add_regular(k, t):
        rec = reading(k, t)
        records.append(rec)
        max_all[k] = max(max_all.get(k, t), t)
        if _numeric(rec.get("temp")):
            max_temp[k] = max(max_temp.get(k, t), t)

    def add_late(k):
        for _ in range(20):
            t = max_all[k] - rng.randrange(30 * 8, 90 * 8) * EIGHTH
            rec = reading(k, t)
            if _numeric(rec.get("temp")) and k in max_temp:
                # In the numeric-temp stream the largest timestamp may be
                # lower; stay clear of that stream's boundary too.
                if abs(t - (max_temp[k] - WAIT)) < MARGIN:
                    continue
                if t > max_temp[k]:
                    continue  # would become that stream's newest item
            records.append(rec)
            if _numeric(rec.get("temp")) and k not in max_temp:
                max_temp[k] = t  # the first item of that stream
            return

    def now_ish():
        return float(min(max_all.values()) if max_all else BASE)

    def add_junk():
        t = now_ish()
        r = rng.randrange(0, 9 if fmt == "jsonl" else 5)
        if fmt == "csv":
            if r == 0:
                records.append({"sensor": None, "ts": t, "temp": 20.5})
            elif r == 1:
                records.append({"sensor": rng.choice(keys), "ts": None, "temp": 20.5})
            elif r == 2:
                records.append({"sensor": rng.choice(keys), "ts": "oops", "temp": 20.5})
            elif r == 3:
                records.append(("RAW", f"s0,{t},20.5,40.0,99,extra"))  # too many cells
            else:
                records.append(("RAW", "s1,1704067200"))  # too few cells
            return
        choices = [
            {"ts": t, "temp": 20.5},  # no sensor
            {"sensor": None, "ts": t, "temp": 20.5},
            {"sensor": True, "ts": t, "temp": 20.5},
            {"sensor": rng.choice(keys), "temp": 20.5},  # no ts
            {"sensor": rng.choice(keys), "ts": "oops", "temp": 20.5},
            {"sensor": rng.choice(keys), "ts": None, "temp": 20.5},
        ]
        raw = ['{"sensor": "s1", "ts": ', "not json", '{"sensor": "s0", "ts": NaN}', "", "   ", "[1, 2]", "42", '"text"']
        if r < len(choices):
            records.append(choices[r])
        else:
            records.append(("RAW", rng.choice(raw)))

    for _, _, k, t in regular:
        if rng.random() < 0.03:
            add_junk()
        add_regular(k, t)
        if rng.random() < 0.05:
            add_late(k)

    seq = 0
    out = []
    for rec in records:
        if isinstance(rec, dict):
            rec["seq"] = seq
        seq += 1
        out.append(rec)
    return out


OFFSETS = [("Z", 0), ("+00:00", 0), ("+01:00", 60), ("-05:00", -300), ("+05:30", 330)]


def iso(t, offset):
    """Epoch seconds t (a multiple of 1/8 s) as local ISO 8601 text."""
    from datetime import datetime, timedelta, timezone

    text, minutes = offset
    whole = int(t // 1)
    local = datetime.fromtimestamp(whole, tz=timezone.utc) + timedelta(minutes=minutes)
    frac = t - whole
    body = local.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        body += f"{frac:.3f}"[1:]
    return body + text


def widen(records, seed, wide, as_iso):
    """Add --wide's fields and --iso's timestamps (own random numbers, so
    the readings themselves stay those of the seed)."""
    rng = random.Random(seed + 1000)
    statuses = ["ok", "ok", "ok", "warn", "low batt", 'say "hi"', "tab\there", "Ω-ok", "line\nbreak"]
    offsets = {}
    for rec in records:
        if not isinstance(rec, dict):
            continue
        if as_iso and _numeric(rec.get("ts")):
            key = str(rec.get("sensor"))
            off = offsets.setdefault(key, OFFSETS[len(offsets) % len(OFFSETS)])
            rec["ts"] = iso(rec["ts"], off)
        if not wide:
            continue
        extra = {
            "status": rng.choice(statuses),
            "loc": {"lat": round(52 + rng.random(), 4), "lon": round(13 + rng.random(), 4), "alt": None},
            "rssi": [-rng.randrange(40, 90) for _ in range(rng.randrange(0, 4))],
            "fw": f"2.{rng.randrange(4)}.{rng.randrange(10)}",
            "ok": rng.random() < 0.9,
        }
        if rng.random() < 0.1:
            extra["diag"] = {"a": [{"b": [1, 2.5e-3, {"c": "d"}]}], "e": []}
        front = {k: extra.pop(k) for k in ["fw"] if rng.random() < 0.3}
        rest = dict(rec)
        rec.clear()
        rec.update(front)
        rec.update(rest)
        rec.update(extra)
    return records


def write(records, path, fmt):
    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for rec in records:
                if isinstance(rec, tuple):
                    f.write(rec[1] + "\n")
                else:
                    f.write(json.dumps(rec) + "\n")
        else:
            cols = ["sensor", "ts", "temp", "rh", "seq"]
            w = csv.writer(f, lineterminator="\n")
            w.writerow(cols)
            for rec in records:
                if isinstance(rec, tuple):
                    f.write(rec[1] + "\n")
                    continue
                row = []
                for c in cols:
                    v = rec.get(c)
                    row.append("" if v is None else repr(v) if isinstance(v, float) else str(v))
                w.writerow(row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", type=int, default=4, help="number of string sensor keys (plus the int sensor 7)")
    ap.add_argument("--n", type=int, default=400, help="number of regular readings")
    ap.add_argument("--format", choices=["jsonl", "csv"], help="default: csv if --out ends in .csv, else jsonl")
    ap.add_argument("--wide", action="store_true", help="(jsonl) more fields per record, nested ones among them")
    ap.add_argument("--iso", action="store_true", help="numeric timestamps as ISO 8601 text with offsets")
    args = ap.parse_args(argv)
    fmt = args.format or ("csv" if args.out.lower().endswith(".csv") else "jsonl")
    if args.wide and fmt != "jsonl":
        ap.error("--wide needs jsonl")
    write(widen(generate(args.seed, args.keys, args.n, fmt), args.seed, args.wide, args.iso), args.out, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
