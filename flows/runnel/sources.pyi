"""Sources: where a flow's input steps read items from.

Every source decodes its bytes into items in Rust; a malformed record is
counted, logged with where it came from (file and line), and skipped.
"""

from typing import Literal

__all__ = ["Source", "file", "mqtt"]

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
