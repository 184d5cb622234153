"""Sinks: where a flow's output steps write items to.

Items are written as JSON: tuples become arrays, datetimes RFC 3339 text,
`WindowMetadata` an object, and anything else its `repr()`.
"""

__all__ = ["Sink", "stdout", "file", "mqtt"]


class Sink:
    """Base class of all runnel sinks; build one with a function of this
    module, e.g. `sinks.stdout()`.

    ```python
    assert isinstance(sinks.stdout(), sinks.Sink)
    ```
    """

    kind = "?"


class _StdoutSink(Sink):
    kind = "stdout"

    def __repr__(self):
        return "sinks.stdout()"


class _FileSink(Sink):
    kind = "file"

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return f"sinks.file({self.path!r})"


def stdout() -> Sink:
    """Write each item as one line of JSON to standard output.

    ```python
    op.output("out", stats.down, sinks.stdout())
    ```
    """
    return _StdoutSink()


def file(path: str) -> Sink:
    """Append each item as one line of JSON (JSON lines) to the file at
    `path`, creating it if needed. A relative path is relative to the flow
    file's folder.

    ```python
    op.output("out", stats.down, sinks.file("/var/lib/runnel/stats.jsonl"))
    ```
    """
    if not isinstance(path, str) or not path:
        raise TypeError(f"sinks.file: `path` must be a non-empty str; got {path!r}")
    return _FileSink(path)


class _MqttSink(Sink):
    kind = "mqtt"

    def __init__(self, topic, broker, qos, encode, retain):
        self.topic = topic
        self.broker = broker
        self.qos = qos
        self.encode = encode
        self.retain = retain

    def __repr__(self):
        return f"sinks.mqtt({self.topic!r}, broker={self.broker!r}, qos={self.qos}, encode={self.encode!r})"


_TOPIC_VARS = ("key", "flow", "step", "device_id")


def mqtt(topic: str, *, broker: str = "upstream", qos: int = 1, encode: str = "json", retain: bool = False) -> Sink:
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
    where = f"sinks.mqtt({topic!r})"
    if not isinstance(topic, str) or not topic:
        raise TypeError(f"sinks.mqtt: `topic` must be a non-empty str; got {topic!r}")
    import string

    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(topic) if f is not None]
    except ValueError as e:
        raise ValueError(f"{where}: {e}; write a literal brace as {{{{ or }}}}") from None
    for n, spec, conv in fields:
        if spec or conv:
            raise ValueError(f"{where}: write placeholders plainly, like {{{n}}}, without ! or :")
        if n not in _TOPIC_VARS:
            raise ValueError(f"{where}: unknown placeholder {{{n}}}; use {', '.join('{' + v + '}' for v in _TOPIC_VARS)}")
    if "+" in topic or "#" in topic:
        raise ValueError(f"{where}: a topic to publish to cannot contain '+' or '#'")
    if not isinstance(broker, str) or not broker:
        raise TypeError(f"{where}: `broker` must name a [brokers.NAME] of the config; got {broker!r}")
    if qos not in (0, 1):
        raise ValueError(f"{where}: `qos` must be 0 or 1; got {qos!r}")
    if encode not in ("json", "cbor"):
        raise ValueError(f"{where}: `encode` must be \"json\" or \"cbor\"; got {encode!r}")
    if not isinstance(retain, bool):
        raise TypeError(f"{where}: `retain` must be a bool; got {retain!r}")
    return _MqttSink(topic, broker, qos, encode, retain)
