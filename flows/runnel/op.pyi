"""Operators: the steps a flow is built from (Bytewax 0.21 vocabulary).

Every operator takes a unique `step_id` first and returns the stream(s) it
produces. Functions you pass are called from runnel's Python thread with the
items of a batch; an exception skips that item, is logged with its traceback
and counted, and the flow goes on.
"""

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Generic, NamedTuple, TypeVar

from runnel import Dataflow, Stream
from runnel.sinks import Sink
from runnel.sources import Source

__all__ = [
    "BranchOut", "input", "output", "map", "filter", "filter_map", "flat_map",
    "flat_map_batch", "key_on", "key_rm", "map_value", "filter_value",
    "flat_map_value", "branch", "merge", "inspect", "stateful_map", "collect",
]

# Type variables: _X/_Y items, _V/_W values of keyed streams `(key, value)`,
# _S per-key state.
_X = TypeVar("_X")
_Y = TypeVar("_Y")
_V = TypeVar("_V")
_W = TypeVar("_W")
_S = TypeVar("_S")

class BranchOut(NamedTuple, Generic[_X]):
    """The two streams `branch` returns: items the predicate accepted (`trues`)
    and the rest (`falses`).

    ```python
    out = op.branch("even", nums, lambda x: x % 2 == 0)
    op.output("evens", out.trues, sinks.stdout())
    ```
    """

    trues: Stream[_X]
    falses: Stream[_X]

def input(step_id: str, flow: Dataflow, source: Source) -> Stream[Any]:
    """Add an input step that emits the items of `source`.

    ```python
    flow = Dataflow("eg")
    readings = op.input("in", flow, sources.file("readings.jsonl"))
    ```
    """

def output(step_id: str, up: Stream[Any], sink: Sink) -> None:
    """Write every item of `up` to `sink`.

    In `runnel replay` (without `--keep-sinks`) output steps print
    `{"step": step_id, "item": item}` lines to stdout instead.

    ```python
    op.output("out", stats.down, sinks.stdout())
    ```
    """

def map(step_id: str, up: Stream[_X], mapper: Callable[[_X], _Y]) -> Stream[_Y]:
    """Transform each item one-to-one with `mapper(item) -> new_item`.

    ```python
    celsius = op.map("to_c", fahrenheit, lambda f: (f - 32) * 5 / 9)
    ```
    """

def filter(step_id: str, up: Stream[_X], predicate: Callable[[_X], object]) -> Stream[_X]:
    """Keep only items for which `predicate(item)` is true.

    ```python
    valid = op.filter("valid", readings, lambda r: r.get("temp") is not None)
    ```
    """

def filter_map(step_id: str, up: Stream[_X], mapper: Callable[[_X], _Y | None]) -> Stream[_Y]:
    """Transform each item with `mapper`, dropping results that are `None`.

    ```python
    temps = op.filter_map("temps", readings, lambda r: r.get("temp"))
    ```
    """

def flat_map(step_id: str, up: Stream[_X], mapper: Callable[[_X], Iterable[_Y]]) -> Stream[_Y]:
    """Transform each item into zero or more items: `mapper(item) -> iterable`.

    ```python
    words = op.flat_map("split", lines, str.split)
    ```
    """

def flat_map_batch(step_id: str, up: Stream[_X], mapper: Callable[[list[_X]], Iterable[_Y]]) -> Stream[_Y]:
    """Transform a whole batch at once: `mapper(list_of_items) -> iterable`.

    Batch boundaries are not meaningful; use this to amortize per-call costs.

    ```python
    doubled = op.flat_map_batch("double", nums, lambda xs: [x * 2 for x in xs])
    ```
    """

def key_on(step_id: str, up: Stream[_X], key: str | Callable[[_X], str]) -> Stream[tuple[str, _X]]:
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

def key_rm(step_id: str, up: Stream[tuple[str, _V]]) -> Stream[_V]:
    """Drop the key of a keyed stream: `(key, value)` becomes `value`.

    ```python
    values = op.key_rm("unkey", stats.down)
    ```
    """

def map_value(step_id: str, up: Stream[tuple[str, _V]], mapper: Callable[[_V], _W]) -> Stream[tuple[str, _W]]:
    """Transform the value of each `(key, value)` item, keeping the key.

    ```python
    celsius = op.map_value("to_c", keyed, lambda f: (f - 32) * 5 / 9)
    ```
    """

def filter_value(
    step_id: str, up: Stream[tuple[str, _V]], predicate: Callable[[_V], object]
) -> Stream[tuple[str, _V]]:
    """Keep `(key, value)` items whose value passes `predicate(value)`.

    ```python
    hot = op.filter_value("hot", keyed, lambda r: r["temp"] > 30)
    ```
    """

def flat_map_value(
    step_id: str, up: Stream[tuple[str, _V]], mapper: Callable[[_V], Iterable[_W]]
) -> Stream[tuple[str, _W]]:
    """Transform each value into zero or more values, keeping the key.

    ```python
    parts = op.flat_map_value("split", keyed_lines, str.split)
    ```
    """

def branch(step_id: str, up: Stream[_X], predicate: Callable[[_X], object]) -> BranchOut[_X]:
    """Split a stream in two by `predicate(item)`.

    ```python
    out = op.branch("even", nums, lambda x: x % 2 == 0)
    evens, odds = out.trues, out.falses
    ```
    """

def merge(step_id: str, *ups: Stream[_X]) -> Stream[_X]:
    """Combine several streams of the same flow into one.

    ```python
    both = op.merge("both", kitchen, garage)
    ```
    """

def inspect(step_id: str, up: Stream[_X], inspector: Callable[[str, _X], object] = ...) -> Stream[_X]:
    """Call `inspector(step_id, item)` on each item and pass it on unchanged.

    By default prints `step_id: repr(item)`.

    ```python
    readings = op.inspect("peek", readings)
    ```
    """

def stateful_map(
    step_id: str, up: Stream[tuple[str, _V]], mapper: Callable[[_S | None, _V], tuple[_S | None, _W]]
) -> Stream[tuple[str, _W]]:
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

def collect(step_id: str, up: Stream[tuple[str, _V]], timeout: timedelta, max_size: int) -> Stream[tuple[str, list[_V]]]:
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
