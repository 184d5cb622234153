"""Regenerate greenhouse.jsonl, the demo's bundled capture (deterministic).

Four sensors report every 5 s for 10 minutes from 2024-01-01T06:00:00Z;
some readings arrive a little out of order, two arrive far too late, one
sensor reports without a temperature once, and two lines are garbage, as a
real serial capture would have.
"""

import json
import math
import random

rng = random.Random(7)
start = 1704088800  # 2024-01-01T06:00:00Z
lines = []
for step in range(120):
    for i, sensor in enumerate(["bench-1", "bench-2", "roof", "door"]):
        ts = start + step * 5 + rng.uniform(0, 0.5)
        temp = 24 + 6 * math.sin(step / 20 + i) + rng.gauss(0, 0.3) + (5 if sensor == "roof" and 60 < step < 70 else 0)
        rh = 55 - 10 * math.sin(step / 25 + i) + rng.gauss(0, 1)
        rec = {"sensor": sensor, "ts": round(ts, 3), "temp": round(temp, 2), "rh": round(rh, 1)}
        if sensor == "door" and step == 40:
            del rec["temp"]
        lines.append((ts + rng.uniform(0, 3), json.dumps(rec)))
lines.sort()
out = [text for _, text in lines]
out.insert(200, json.dumps({"sensor": "bench-1", "ts": start + 30, "temp": 25.0, "rh": 50.0}))  # ~6 min late
out.insert(300, "{\"sensor\": \"roof\", \"ts\": 17040")  # truncated line
out.insert(301, json.dumps({"sensor": "door", "ts": start + 100, "temp": 20.0, "rh": 60.0}))  # late
out.insert(400, "\x00\x00garbage from a noisy line")
with open(__file__.rsplit("/", 1)[0] + "/greenhouse.jsonl", "w") as f:
    f.write("\n".join(out) + "\n")
