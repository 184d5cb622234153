"""Benchmark flow: MQTT ingest with per-device window statistics (see mqtt_bench.py).

mqtt_bench.py copies this file into the flows folder of a private
`runnel run` and sets RUNNEL_BENCH_QOS (0 or 1) in runnel's environment:
the subscription's QoS. The flow id "mqtt_bench" is what the benchmark reads
in runnel's stats (`runnel/bench/stats`, `flows.mqtt_bench.in`).

    bench/<device>/reading  --sources.mqtt, QoS from RUNNEL_BENCH_QOS-->
    key_on "device" --> EventClock "ts" (s, wait 1 s) --> 10 s tumbling
    --> win.aggregate temp count/mean/max, rh mean
        .down --> bench-up/<device>    (broker "upstream")
        .late --> bench-late/<device>  (broker "upstream")

All native: no Python runs per message. Keep WINDOW, WAIT and ALIGN_TO in
sync with mqtt_bench.py, which predicts every window's close from them.
"""

import os
from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

QOS = int(os.environ.get("RUNNEL_BENCH_QOS", "1"))

WINDOW = timedelta(seconds=10)
WAIT = timedelta(seconds=1)
ALIGN_TO = datetime(2024, 1, 1, tzinfo=timezone.utc)

flow = Dataflow("mqtt_bench")
readings = op.input("in", flow, sources.mqtt("bench/{device}/reading", qos=QOS))
by_device = op.key_on("by_device", readings, "device")
clock = win.EventClock("ts", wait_for_system_duration=WAIT, unit="s")
windower = win.TumblingWindower(length=WINDOW, align_to=ALIGN_TO)
stats = win.aggregate("stats", by_device, clock, windower,
                      {"temp": ["count", "mean", "max"], "rh": ["mean"]})
op.output("up", stats.down, sinks.mqtt("bench-up/{key}", broker="upstream"))
op.output("late", stats.late, sinks.mqtt("bench-late/{key}", broker="upstream"))
