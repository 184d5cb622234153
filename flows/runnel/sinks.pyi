"""Sinks: where a flow's output steps write items to.

Items are written as JSON: tuples become arrays, datetimes RFC 3339 text,
`WindowMetadata` an object, and anything else its `repr()`.
"""

from typing import Literal

__all__ = ["Sink", "stdout", "file", "mqtt"]

class Sink:
    """Base class of all runnel sinks; build one with a function of this
    module, e.g. `sinks.stdout()`.

    ```python
    assert isinstance(sinks.stdout(), sinks.Sink)
    ```
    """

    kind: str

def stdout() -> Sink:
    """Write each item as one line of JSON to standard output.

    ```python
    op.output("out", stats.down, sinks.stdout())
    ```
    """

def file(path: str) -> Sink:
    """Append each item as one line of JSON (JSON lines) to the file at
    `path`, creating it if needed. A relative path is relative to the flow
    file's folder.

    ```python
    op.output("out", stats.down, sinks.file("/var/lib/runnel/stats.jsonl"))
    ```
    """

def mqtt(
    topic: str,
    *,
    broker: str = ...,
    qos: Literal[0, 1] = ...,
    encode: Literal["json", "cbor"] = ...,
    retain: bool = ...,
) -> Sink:
    """Publish each item to a broker of the agent's config
    (`[brokers.NAME]` in `runnel.toml`), through the agent's durable outbox.

    Every item is first committed to the outbox in `state_dir/runnel.redb`;
    the broker's forwarder publishes entries in order and deletes one only
    after the broker acknowledged it (QoS 1), resending after any disconnect
    or restart. `topic` may contain `{key}`, `{flow}`, `{step}` and
    `{device_id}`; `/`, `+` and `#` in a key become `_`.

    Each message is one object (`encode="json"` or `"cbor"`):
    `{"id", "seq", "device_id", "flow", "step", "key", "window", "value"}`.
    A window result `(key, (window_id, value))` fills `key`, `window` and
    `value`; a keyed item `(key, value)` has no `window`; anything else only
    `value`. `id` names the result (`device/flow/step/key/window`, or
    `.../#seq` for items without a window) and `seq` counts this sink's
    messages: a resent duplicate has the same `id` and `seq`, so a receiver
    drops it by `(device_id, flow, step, seq)`.

    ```python
    op.output("up", stats.down, sinks.mqtt("fleet/{device_id}/{flow}/{key}"))
    ```
    """
