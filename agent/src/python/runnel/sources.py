"""Sources: where a flow's input steps read items from.

Every source decodes its bytes into items in Rust; a malformed record is
counted, logged with where it came from (file and line), and skipped.
"""

__all__ = ["Source", "file", "mqtt", "serial"]

_DECODES = ("jsonl", "csv")


class Source:
    """Base class of all runnel sources; build one with a function of this
    module, e.g. `sources.file("data.jsonl")`.

    ```python
    src = sources.file("readings.jsonl")
    assert isinstance(src, sources.Source)
    ```
    """

    kind = "?"


class _FileSource(Source):
    kind = "file"

    def __init__(self, path, decode):
        self.path = path
        self.decode = decode

    def __repr__(self):
        return f"sources.file({self.path!r}, decode={self.decode!r})"


def file(path: str, decode: "str | None" = None) -> Source:
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
    import os

    if not isinstance(path, str) or not path:
        raise TypeError(f"sources.file: `path` must be a non-empty str; got {path!r}")
    if decode is None:
        decode = "csv" if path.lower().endswith(".csv") else "jsonl"
    if decode not in _DECODES:
        raise ValueError(f"sources.file({path!r}): `decode` must be one of {', '.join(_DECODES)}; got {decode!r}")
    return _FileSource(os.fspath(path), decode)


_MQTT_DECODES = ("json", "cbor", "csv", "kv", "nmea", "raw")


class _MqttSource(Source):
    kind = "mqtt"

    def __init__(self, topics, broker, qos, decode, columns, topic_field, max_payload, ack):
        self.ack = ack
        self.topics = topics
        self.broker = broker
        self.qos = qos
        self.decode = decode
        self.columns = columns
        self.topic_field = topic_field
        self.max_payload = max_payload

    def __repr__(self):
        return f"sources.mqtt({self.topics!r}, broker={self.broker!r}, qos={self.qos}, decode={self.decode!r})"


def _columns(where, decode, columns):
    """`columns=` of a source, validated: None, or a list of names for CSV."""
    if columns is None:
        return None
    if decode != "csv":
        raise ValueError(f"{where}: `columns` is only for decode=\"csv\"")
    if not isinstance(columns, (list, tuple)) or not columns or not all(isinstance(c, str) and c for c in columns):
        raise TypeError(f"{where}: `columns` must be a non-empty list of str; got {columns!r}")
    return list(columns)


def _topic_fields(topic: str, where: str):
    """The `{name}` levels of a topic filter, validated."""
    names = []
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if level.startswith("{") and level.endswith("}") and len(level) > 2:
            name = level[1:-1]
            if not name.isidentifier():
                raise ValueError(f"{where}: topic level {level!r} must name a field like {{device}}")
            names.append(name)
        elif "{" in level or "}" in level:
            raise ValueError(f"{where}: a field level must be a whole level like sensors/{{device}}/temp; got {level!r}")
        elif level == "#" and i != len(levels) - 1:
            raise ValueError(f"{where}: '#' must be the last level of {topic!r}")
        elif ("#" in level or "+" in level) and level not in ("#", "+"):
            raise ValueError(f"{where}: '+' and '#' must be whole levels; got {level!r} in {topic!r}")
    return names


def mqtt(
    topics,
    *,
    broker: str = "default",
    qos: int = 1,
    decode: str = "json",
    columns=None,
    topic_field=None,
    max_payload: int = 262144,
    ack: str = "on-receive",
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
    where = f"sources.mqtt({topics!r})"
    if isinstance(topics, str):
        topics = [topics]
    if not isinstance(topics, (list, tuple)) or not topics or not all(isinstance(t, str) and t for t in topics):
        raise TypeError(f"{where}: `topics` must be a non-empty str or a list of them")
    for t in topics:
        _topic_fields(t, where)
    if not isinstance(broker, str) or not broker:
        raise TypeError(f"{where}: `broker` must name a [brokers.NAME] of the config; got {broker!r}")
    if qos not in (0, 1):
        raise ValueError(f"{where}: `qos` must be 0 or 1; got {qos!r}")
    if decode not in _MQTT_DECODES:
        raise ValueError(f"{where}: `decode` must be one of {', '.join(_MQTT_DECODES)}; got {decode!r}")
    columns = _columns(where, decode, columns)
    if topic_field is not None and (not isinstance(topic_field, str) or not topic_field):
        raise TypeError(f"{where}: `topic_field` must be a non-empty str or None; got {topic_field!r}")
    if isinstance(max_payload, bool) or not isinstance(max_payload, int) or max_payload < 1:
        raise ValueError(f"{where}: `max_payload` must be a positive int (bytes); got {max_payload!r}")
    if ack not in ("on-receive", "after-commit"):
        raise ValueError(f"{where}: `ack` must be \"on-receive\" or \"after-commit\"; got {ack!r}")
    if ack == "after-commit" and qos != 1:
        raise ValueError(f"{where}: ack=\"after-commit\" needs qos=1 (QoS 0 messages are never acknowledged)")
    return _MqttSource(list(topics), broker, qos, decode, columns, topic_field, max_payload, ack)


_SERIAL_DECODES = ("json", "csv", "kv", "nmea", "cbor", "raw")


class _SerialSource(Source):
    kind = "serial"

    def __init__(self, port, baud, data_bits, parity, stop_bits, flow_control, framing, max_frame, decode, columns,
                 timestamp_field):
        self.port = port
        self.baud = baud
        self.data_bits = data_bits
        self.parity = parity
        self.stop_bits = stop_bits
        self.flow_control = flow_control
        self.framing = framing
        self.max_frame = max_frame
        self.decode = decode
        self.columns = columns
        self.timestamp_field = timestamp_field

    def __repr__(self):
        return (f"sources.serial({self.port!r}, baud={self.baud}, framing={self.framing!r}, "
                f"decode={self.decode!r})")


def serial(
    port: str,
    *,
    baud: int = 115200,
    data_bits: int = 8,
    parity: str = "none",
    stop_bits: int = 1,
    flow_control: str = "none",
    framing: str = "lines",
    max_frame: int = 4096,
    decode: str = "json",
    columns=None,
    timestamp_field=None,
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
    import os

    where = f"sources.serial({port!r})"
    if not isinstance(port, str) or not port:
        raise TypeError(f"sources.serial: `port` must be a non-empty str such as \"/dev/ttyUSB0\"; got {port!r}")
    if isinstance(baud, bool) or not isinstance(baud, int) or not 50 <= baud <= 16_000_000:
        raise ValueError(f"{where}: `baud` must be an int between 50 and 16000000; got {baud!r}")
    if data_bits not in (5, 6, 7, 8) or isinstance(data_bits, bool):
        raise ValueError(f"{where}: `data_bits` must be 5, 6, 7 or 8; got {data_bits!r}")
    if parity not in ("none", "odd", "even"):
        raise ValueError(f"{where}: `parity` must be \"none\", \"odd\" or \"even\"; got {parity!r}")
    if stop_bits not in (1, 2) or isinstance(stop_bits, bool):
        raise ValueError(f"{where}: `stop_bits` must be 1 or 2; got {stop_bits!r}")
    if flow_control not in ("none", "software", "hardware"):
        raise ValueError(f"{where}: `flow_control` must be \"none\", \"software\" or \"hardware\"; got {flow_control!r}")
    if framing not in ("lines", "cobs"):
        raise ValueError(f"{where}: `framing` must be \"lines\" or \"cobs\"; got {framing!r}")
    if isinstance(max_frame, bool) or not isinstance(max_frame, int) or not 16 <= max_frame <= 1 << 20:
        raise ValueError(f"{where}: `max_frame` must be an int between 16 and 1048576 (bytes); got {max_frame!r}")
    if decode not in _SERIAL_DECODES:
        raise ValueError(f"{where}: `decode` must be one of {', '.join(_SERIAL_DECODES)}; got {decode!r}")
    if decode == "csv" and framing == "cobs" and columns is None:
        raise ValueError(f"{where}: decode=\"csv\" with framing=\"cobs\" needs columns=[...]")
    if decode == "cbor" and framing != "cobs":
        raise ValueError(f"{where}: decode=\"cbor\" needs framing=\"cobs\" (CBOR is binary: a newline byte can be part of it)")
    columns = _columns(where, decode, columns)
    if timestamp_field is not None and (not isinstance(timestamp_field, str) or not timestamp_field):
        raise TypeError(f"{where}: `timestamp_field` must be a non-empty str or None; got {timestamp_field!r}")
    return _SerialSource(os.fspath(port), baud, data_bits, parity, stop_bits, flow_control, framing, max_frame, decode,
                         columns, timestamp_field)
