"""A GPS receiver on the Pi's UART (/dev/serial0): NMEA sentences, checksums
verified; per minute, the mean position and the top speed.

Enable the UART with raspi-config (Interface Options > Serial Port: no login
shell, hardware enabled), copy this file to /etc/runnel/flows/, and give
[brokers.upstream] in runnel.toml.
"""

from datetime import datetime, timedelta, timezone

from runnel import Dataflow, op, sinks, sources, win

flow = Dataflow("gps")
fixes = op.input("fixes", flow, sources.serial("/dev/serial0", baud=9600, decode="nmea"))
rmc = op.filter("rmc", fixes, lambda f: f["sentence"] == "RMC" and f["fix"] == 1)
by_receiver = op.key_on("by_receiver", rmc, "talker")
clock = win.EventClock("utc", wait_for_system_duration=timedelta(seconds=2))
minutes = win.TumblingWindower(length=timedelta(minutes=1), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
track = win.aggregate("per_minute", by_receiver, clock, minutes,
                      {"lat": ["mean"], "lon": ["mean"], "speed_kn": ["max", "mean"]})
op.output("up", track.down, sinks.mqtt("fleet/{device_id}/{flow}/{key}"))
