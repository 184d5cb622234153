"""MQTT readings in, per-minute summaries upstream (README "MQTT").

Copy to /etc/runnel/flows/ and give [brokers.upstream] in runnel.toml.
"""
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("temps")
# `{device}` matches one topic level, like `+`, and becomes the field "device".
readings = op.input("in", flow, sources.mqtt("sensors/{device}/temp"))
by_device = op.key_on("by_device", readings, "device")          # native: no Python per message
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=5), unit="s")
minutes = win.TumblingWindower(length=timedelta(minutes=1),
                               align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per_minute", by_device, clock, minutes, {"temp": ["count", "mean", "max"]})
op.output("up", stats.down, sinks.mqtt("fleet/{device_id}/{flow}/{key}"))
