"""Sources: where a flow's input steps read items from.

Every source decodes its bytes into items in Rust; a malformed record is
counted, logged with where it came from (file and line), and skipped.
"""

from typing import Literal

__all__ = ["Source", "file", "mqtt", "serial"]

class Source:
    """Base class of all runnel sources; build one with a function of this
    module, e.g. `sources.file("data.jsonl")`.

    ```python
    src = sources.file("readings.jsonl")
    assert isinstance(src, sources.Source)
    ```
    """

    kind: str

def file(path: str, decode: Literal["jsonl", "csv"] | None = ...) -> Source:
    """Read items from a file, once, from start to end.

    `decode="jsonl"`: one JSON value per line (blank lines are skipped).
    `decode="csv"`: a header row, then one dict per row; cells that read as
    integers or floats become numbers, empty cells `None`, others `str`.
    Without `decode`, a path ending in `.csv` is CSV and anything else JSON
    lines. A relative path is relative to the flow file's folder.

    ```python
    readings = op.input("in", flow, sources.file("captures/greenhouse.jsonl"))
    rows = op.input("rows", flow, sources.file("log.csv", decode="csv"))
    ```
    """

def mqtt(
    topics: str | list[str],
    *,
    broker: str = ...,
    qos: Literal[0, 1] = ...,
    decode: Literal["json", "cbor", "csv", "kv", "nmea", "raw"] = ...,
    columns: list[str] | None = ...,
    topic_field: str | None = ...,
    max_payload: int = ...,
    ack: Literal["on-receive", "after-commit"] = ...,
) -> Source:
    """Subscribe to MQTT topics on a broker of the agent's config
    (`[brokers.NAME]` in `runnel.toml`); every message becomes items.

    `topics` is one topic filter or a list of them. `+` matches one level and
    `#` the rest, as in MQTT. A level written `{name}` matches one level like
    `+` and puts that level's text into the field `name` of every item, so a
    flow keys by the device id in the topic without any Python per item:

    ```python
    temps = op.input("temps", flow, sources.mqtt("sensors/{device}/temp"))
    by_device = op.key_on("by_device", temps, "device")
    ```

    `topic_field="topic"` puts the whole topic into the field `topic`.
    Topic fields overwrite payload fields of the same name. A payload that is
    not a dict becomes `{"value": payload}` when topic fields are asked for.

    `decode`: `"json"` (one JSON value per message), `"cbor"` (one CBOR item;
    text-keyed maps become dicts), `"csv"` (each line a row; the first line of
    a message is its header unless `columns=[...]` names the cells), `"kv"`
    (each line `id=a1 t=21.5 h=40`; values typed as CSV cells are), `"nmea"`
    (each line an NMEA 0183 sentence, checksum verified; GGA and RMC give
    `lat`, `lon`, `alt`, `speed_kn`, `fix`, `utc` and the rest, other
    sentences are passed over), or `"raw"` (the payload as a `str`). A payload that does not decode, or is
    longer than `max_payload` bytes, is counted, logged and skipped.

    `qos` is the subscription's QoS (0 or 1). `ack` says when a QoS 1 message
    is acknowledged to the broker: `"on-receive"` (the default) once its items
    are handed to the flow, so a crash loses at most the last
    `snapshot_interval` of readings; `"after-commit"` only once the state they
    changed is committed to the state file, so a crash or power cut loses
    nothing (the broker sends the rest again, and runnel counts each reading
    once). `"after-commit"` needs QoS 1 and `persistent_session = true` on the
    broker, and commits every few messages (see `max_inflight`), which costs
    SD-card writes.

    ```python
    rows = op.input("rows", flow, sources.mqtt(["plant/+/csv", "plant/line2/#"],
                                               decode="csv", columns=["ts", "temp"],
                                               topic_field="topic"))
    ```
    """

def serial(
    port: str,
    *,
    baud: int = ...,
    data_bits: Literal[5, 6, 7, 8] = ...,
    parity: Literal["none", "odd", "even"] = ...,
    stop_bits: Literal[1, 2] = ...,
    flow_control: Literal["none", "software", "hardware"] = ...,
    framing: Literal["lines", "cobs"] = ...,
    max_frame: int = ...,
    decode: Literal["json", "csv", "kv", "nmea", "cbor", "raw"] = ...,
    columns: list[str] | None = ...,
    timestamp_field: str | None = ...,
) -> Source:
    """Read a serial device: a UART, or a USB-serial adapter of an Arduino,
    ESP board, GPS receiver or meter. Use a stable path such as
    `/dev/serial/by-id/usb-...` (a USB adapter's `/dev/ttyUSB0` can change
    name when it is plugged in again).

    The port is opened exclusively with `baud`, `data_bits` (5 to 8),
    `parity` (`"none"`, `"odd"`, `"even"`), `stop_bits` (1 or 2) and
    `flow_control` (`"none"`, `"software"`, `"hardware"`). When the device
    goes away (unplugged, reset, the path gone) runnel waits for it and reads
    it again at the same path; what it read before is kept, and the flow's
    windows go on closing while it is away.

    `framing="lines"`: each line (ended by `\\n`, `\\r\\n` or `\\r`) is a frame.
    `framing="cobs"`: COBS-encoded frames, each ended by a zero byte, as
    microcontrollers send binary data. A frame over `max_frame` bytes (as
    sent: COBS adds a byte per 254) is skipped.

    `decode` turns each frame into items: `"json"`, `"csv"` (cells typed as
    in the file source; the first line read is the header unless
    `columns=[...]` names the cells; COBS frames need `columns`), `"kv"` (`id=a1 t=21.5 h=40`),
    `"nmea"` (NMEA 0183 GGA and RMC, checksum verified: `lat`, `lon`, `alt`,
    `speed_kn`, `fix`, `utc`, ...; other sentences are passed over), `"cbor"`
    (needs `framing="cobs"`), or `"raw"` (the frame as a `str`). A frame that
    does not decode is counted, logged and skipped.

    `timestamp_field="received"` puts the time each frame was read (a UTC
    `datetime`) into that field, for a device that sends no time of its own;
    items that are not dicts become `{"value": item}`.

    ```python
    gps = op.input("gps", flow, sources.serial("/dev/serial0", baud=9600, decode="nmea"))
    air = op.input("air", flow, sources.serial("/dev/serial/by-id/usb-Arduino_Uno-if00",
                                               decode="kv", timestamp_field="received"))
    ```
    """
