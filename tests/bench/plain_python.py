"""Benchmark contender: a plain Python loop, no framework (see bench.py).

The lower bound for doing the job in CPython by hand: read lines, json.loads,
keep per-(sensor, window) [sum, count], and apply Bytewax's event-time rule
per sensor (without its system-time drift):

- watermark = largest ts seen for that sensor - WAIT;
- a reading with ts < watermark is late and dropped;
- a window is emitted once its close time <= watermark; EOF emits the rest.

Usage: python plain_python.py DATA.jsonl OUT.jsonl [s|iso]
("iso": the "ts" field is ISO 8601 text with an offset, else epoch seconds)
Each output line is `[sensor, [window_id, mean]]`.
Keep WINDOW, WAIT and ALIGN_TO in sync with bench.py and the other flows.
"""

import json
import math
import sys
from datetime import datetime

WINDOW = 10.0  # seconds
WAIT = 5.0  # seconds
ALIGN_TO = 1704067200.0  # 2024-01-01T00:00:00Z


def main(data_path, out_path, unit="s"):
    loads, floor, dumps = json.loads, math.floor, json.dumps
    iso = unit == "iso"
    fromiso = datetime.fromisoformat
    # sensor -> [watermark, earliest open window's close time, {window_id: [sum, count]}]
    state = {}
    late = 0
    with open(data_path, "rb") as src, open(out_path, "w") as out:
        write = out.write

        def emit_closed(key, st):
            wm, windows = st[0], st[2]
            for wid in sorted(windows):
                if ALIGN_TO + (wid + 1) * WINDOW > wm:
                    break
                total, count = windows.pop(wid)
                write(dumps([key, [wid, total / count]]) + "\n")
            st[1] = ALIGN_TO + (min(windows) + 1) * WINDOW if windows else math.inf

        for line in src:
            if not line.strip():
                continue
            r = loads(line)
            key, ts = r["sensor"], r["ts"]
            if iso:
                ts = fromiso(ts).timestamp()
            st = state.get(key)
            if st is None:
                st = state[key] = [-math.inf, math.inf, {}]
            if ts < st[0]:
                late += 1
                continue
            wid = floor((ts - ALIGN_TO) / WINDOW)
            acc = st[2].get(wid)
            if acc is None:
                st[2][wid] = [r["temp"], 1]
                st[1] = min(st[1], ALIGN_TO + (wid + 1) * WINDOW)
            else:
                acc[0] += r["temp"]
                acc[1] += 1
            if ts - WAIT > st[0]:
                st[0] = ts - WAIT
                if st[1] <= st[0]:
                    emit_closed(key, st)
        for key, st in state.items():  # EOF: the watermark jumps to the end of time
            st[0] = math.inf
            emit_closed(key, st)
    if late:
        print(f"plain_python: {late} late readings dropped", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
