"""Operators: the steps a flow is built from (Bytewax 0.21 vocabulary).

Every operator takes a unique `step_id` first and returns the stream(s) it
produces. Functions you pass are called from runnel's Python thread with the
items of a batch; an exception skips that item, is logged with its traceback
and counted, and the flow goes on.
"""

# Not typing.NamedTuple: importing typing costs every agent 1.4 MiB.
from collections import namedtuple as _namedtuple

from runnel import Dataflow, Stream, _caller_location
from runnel.sources import Source as _Source
from runnel.sinks import Sink as _Sink

__all__ = [
    "BranchOut", "input", "output", "map", "filter", "filter_map", "flat_map",
    "flat_map_batch", "key_on", "key_rm", "map_value", "filter_value",
    "flat_map_value", "branch", "merge", "inspect", "stateful_map", "collect",
]


class BranchOut(_namedtuple("BranchOut", ["trues", "falses"])):
    """The two streams `branch` returns: items the predicate accepted (`trues`)
    and the rest (`falses`).

    ```python
    out = op.branch("even", nums, lambda x: x % 2 == 0)
    op.output("evens", out.trues, sinks.stdout())
    ```
    """

    __slots__ = ()


def _check_fn(step_id, name, fn):
    if not callable(fn):
        raise TypeError(
            f"step {step_id!r} at {_caller_location()}: `{name}` must be callable; "
            f"got {type(fn).__name__}"
        )


def _one(up, kind, step_id, params):
    (down,) = up.flow._add_step(kind, step_id, [up], 1, params)
    return down


def input(step_id: str, flow: Dataflow, source: _Source) -> Stream:  # noqa: A001
    """Add an input step that emits the items of `source`.

    ```python
    flow = Dataflow("eg")
    readings = op.input("in", flow, sources.file("readings.jsonl"))
    ```
    """
    if not isinstance(flow, Dataflow):
        raise TypeError(f"op.input {step_id!r}: `flow` must be a Dataflow; got {type(flow).__name__}")
    if not isinstance(source, _Source):
        raise TypeError(
            f"op.input {step_id!r} at {_caller_location()}: `source` must come from "
            f"runnel.sources; got {type(source).__name__}"
        )
    (down,) = flow._add_step("input", step_id, [], 1, {"source": source})
    return down


def output(step_id: str, up: Stream, sink: _Sink) -> None:
    """Write every item of `up` to `sink`.

    In `runnel replay` (without `--keep-sinks`) output steps print
    `{"step": step_id, "item": item}` lines to stdout instead.

    ```python
    op.output("out", stats.down, sinks.stdout())
    ```
    """
    if not isinstance(sink, _Sink):
        raise TypeError(
            f"op.output {step_id!r} at {_caller_location()}: `sink` must come from "
            f"runnel.sinks; got {type(sink).__name__}"
        )
    up.flow._add_step("output", step_id, [up], 0, {"sink": sink})


def map(step_id: str, up: Stream, mapper) -> Stream:  # noqa: A001
    """Transform each item one-to-one with `mapper(item) -> new_item`.

    ```python
    celsius = op.map("to_c", fahrenheit, lambda f: (f - 32) * 5 / 9)
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "map", step_id, {"fn": mapper})


def filter(step_id: str, up: Stream, predicate) -> Stream:  # noqa: A001
    """Keep only items for which `predicate(item)` is true.

    ```python
    valid = op.filter("valid", readings, lambda r: r.get("temp") is not None)
    ```
    """
    _check_fn(step_id, "predicate", predicate)
    return _one(up, "filter", step_id, {"fn": predicate})


def filter_map(step_id: str, up: Stream, mapper) -> Stream:
    """Transform each item with `mapper`, dropping results that are `None`.

    ```python
    temps = op.filter_map("temps", readings, lambda r: r.get("temp"))
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "filter_map", step_id, {"fn": mapper})


def flat_map(step_id: str, up: Stream, mapper) -> Stream:
    """Transform each item into zero or more items: `mapper(item) -> iterable`.

    ```python
    words = op.flat_map("split", lines, str.split)
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "flat_map", step_id, {"fn": mapper})


def flat_map_batch(step_id: str, up: Stream, mapper) -> Stream:
    """Transform a whole batch at once: `mapper(list_of_items) -> iterable`.

    Batch boundaries are not meaningful; use this to amortize per-call costs.

    ```python
    doubled = op.flat_map_batch("double", nums, lambda xs: [x * 2 for x in xs])
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "flat_map_batch", step_id, {"fn": mapper})


def key_on(step_id: str, up: Stream, key) -> Stream:
    """Make a keyed stream of `(key, item)` 2-tuples.

    `key` is a function `key(item) -> str`, or (runnel's fast path) the name
    of a field of dict items, read in Rust without calling Python. A field's
    value that is not a string is turned into one (`42` -> `"42"`); an item
    without the field is counted and skipped.

    ```python
    keyed = op.key_on("by_sensor", readings, "sensor")
    keyed = op.key_on("by_sensor", readings, lambda r: r["sensor"])
    ```
    """
    if isinstance(key, str):
        return _one(up, "key_on_field", step_id, {"field": key})
    _check_fn(step_id, "key", key)
    return _one(up, "key_on", step_id, {"fn": key})


def key_rm(step_id: str, up: Stream) -> Stream:
    """Drop the key of a keyed stream: `(key, value)` becomes `value`.

    ```python
    values = op.key_rm("unkey", stats.down)
    ```
    """
    return _one(up, "key_rm", step_id, {})


def map_value(step_id: str, up: Stream, mapper) -> Stream:
    """Transform the value of each `(key, value)` item, keeping the key.

    ```python
    celsius = op.map_value("to_c", keyed, lambda f: (f - 32) * 5 / 9)
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "map_value", step_id, {"fn": mapper})


def filter_value(step_id: str, up: Stream, predicate) -> Stream:
    """Keep `(key, value)` items whose value passes `predicate(value)`.

    ```python
    hot = op.filter_value("hot", keyed, lambda r: r["temp"] > 30)
    ```
    """
    _check_fn(step_id, "predicate", predicate)
    return _one(up, "filter_value", step_id, {"fn": predicate})


def flat_map_value(step_id: str, up: Stream, mapper) -> Stream:
    """Transform each value into zero or more values, keeping the key.

    ```python
    parts = op.flat_map_value("split", keyed_lines, str.split)
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "flat_map_value", step_id, {"fn": mapper})


def branch(step_id: str, up: Stream, predicate) -> BranchOut:
    """Split a stream in two by `predicate(item)`.

    ```python
    out = op.branch("even", nums, lambda x: x % 2 == 0)
    evens, odds = out.trues, out.falses
    ```
    """
    _check_fn(step_id, "predicate", predicate)
    trues, falses = up.flow._add_step("branch", step_id, [up], 2, {"fn": predicate})
    return BranchOut(trues, falses)


def merge(step_id: str, *ups: Stream) -> Stream:
    """Combine several streams of the same flow into one.

    ```python
    both = op.merge("both", kitchen, garage)
    ```
    """
    if not ups:
        raise TypeError(f"op.merge {step_id!r} at {_caller_location()}: needs at least one stream")
    (down,) = ups[0].flow._add_step("merge", step_id, list(ups), 1, {})
    return down


def _default_inspector(step_id, item):
    print(f"{step_id}: {item!r}", flush=True)


def inspect(step_id: str, up: Stream, inspector=_default_inspector) -> Stream:
    """Call `inspector(step_id, item)` on each item and pass it on unchanged.

    By default prints `step_id: repr(item)`.

    ```python
    readings = op.inspect("peek", readings)
    ```
    """
    _check_fn(step_id, "inspector", inspector)
    return _one(up, "inspect", step_id, {"fn": inspector})


def stateful_map(step_id: str, up: Stream, mapper) -> Stream:
    """Transform values with per-key state: `mapper(state, value) -> (state, out)`.

    `state` is `None` for a key's first value; returning `None` as the new
    state forgets the key.

    ```python
    def running_count(count, _value):
        count = (count or 0) + 1
        return count, count
    counts = op.stateful_map("count", keyed, running_count)
    ```
    """
    _check_fn(step_id, "mapper", mapper)
    return _one(up, "stateful_map", step_id, {"fn": mapper})


def collect(step_id: str, up: Stream, timeout, max_size: int) -> Stream:
    """Gather the values of each key into lists of up to `max_size` items,
    emitting early once `timeout` (a `timedelta` of system time) passes
    without a new value for that key, as in Bytewax. End of input emits
    what is left.

    In `runnel replay` only `max_size` and end of input emit lists, so
    replays are deterministic.

    ```python
    batches = op.collect("batch", keyed, timedelta(seconds=10), max_size=50)
    ```
    """
    from datetime import timedelta

    if not isinstance(timeout, timedelta):
        raise TypeError(f"op.collect {step_id!r}: `timeout` must be a timedelta; got {timeout!r}")
    if not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"op.collect {step_id!r}: `max_size` must be a positive int; got {max_size!r}")
    return _one(up, "collect", step_id, {"timeout": timeout, "max_size": max_size})
