"""A particle sensor on an Arduino over USB serial, per-minute statistics
upstream (README "Serial devices").

Copy to /etc/runnel/flows/, set the port to your board's /dev/serial/by-id/ path,
and give [brokers.upstream] in runnel.toml.
"""
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, sources, sinks, win

flow = Dataflow("air")
# Lines like "id=pm1 pm25=7.5 t=21.0" from a board that sends no time of its own.
air = op.input("air", flow, sources.serial("/dev/serial/by-id/usb-Arduino_Uno_8543-if00",
                                           baud=115200, decode="kv", timestamp_field="received"))
by_sensor = op.key_on("by_sensor", air, "id")
clock = win.EventClock("received", wait_for_system_duration=timedelta(seconds=1))
minutes = win.TumblingWindower(timedelta(minutes=1), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per_minute", by_sensor, clock, minutes, {"pm25": ["mean", "max"]})
op.output("up", stats.down, sinks.mqtt("fleet/{device_id}/{flow}/{key}"))
