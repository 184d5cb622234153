"""Windowing: clocks, windowers and window operators (Bytewax 0.21 vocabulary).

A window operator groups the values of each key of a keyed stream into
windows of time, then emits one result per window when the window closes.
Time comes from a *clock*; which windows an item belongs to comes from a
*windower*. Every window operator returns a :class:`WindowOut`:

- `down`: `(key, (window_id, result))` when a window closes,
- `late`: `(key, (window_id, item))` for items that arrived after the
  watermark had passed them (never folded into a window),
- `meta`: `(key, (window_id, WindowMetadata(open_time, close_time)))`.

Window `i` of a tumbling or sliding windower covers
`[align_to + i * offset, align_to + i * offset + length)`; ids can be negative.
"""

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from runnel import Stream

__all__ = [
    "EventClock", "SystemClock", "TumblingWindower", "SlidingWindower",
    "SessionWindower", "WindowMetadata", "WindowOut", "fold_window",
    "reduce_window", "collect_window", "count_window", "max_window",
    "min_window", "aggregate",
]

# Type variables: _X items, _V values of keyed streams `(key, value)`,
# _A fold accumulators, _R window results.
_X = TypeVar("_X")
_V = TypeVar("_V")
_A = TypeVar("_A")
_R = TypeVar("_R")

class EventClock:
    """Use each item's own timestamp as time (event time).

    The watermark of a key is the largest timestamp seen minus
    `wait_for_system_duration`; while no new items arrive it advances with
    the system's monotonic clock (never in `runnel replay`, where time comes
    from the data alone). Items older than the watermark are late.

    `ts_getter` is a function `item -> datetime` (timezone-aware), or, on
    runnel's fast path, the name of a field of dict items read in Rust, with
    `unit` saying how to read it: `"s"`, `"ms"`, `"us"`, `"ns"` since the Unix
    epoch, or `"iso8601"` text (a text without offset is read as UTC).

    ```python
    clock = win.EventClock(lambda r: r["at"], wait_for_system_duration=timedelta(seconds=5))
    clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=5), unit="ms")
    ```
    """

    ts_getter: str | Callable[[Any], datetime]
    wait_for_system_duration: timedelta
    unit: str
    def __init__(
        self,
        ts_getter: str | Callable[[Any], datetime],
        wait_for_system_duration: timedelta,
        unit: Literal["s", "ms", "us", "ns", "iso8601"] = ...,
    ) -> None: ...

class SystemClock:
    """Use the system's UTC time when an item is processed as its timestamp.
    No item is ever late.

    ```python
    clock = win.SystemClock()
    ```
    """

class TumblingWindower:
    """Back-to-back windows of fixed `length`, aligned to `align_to`.

    ```python
    from datetime import datetime, timedelta, timezone
    align = datetime(2024, 1, 1, tzinfo=timezone.utc)
    windower = win.TumblingWindower(length=timedelta(seconds=10), align_to=align)
    ```
    """

    length: timedelta
    align_to: datetime
    def __init__(self, length: timedelta, align_to: datetime) -> None: ...

class SlidingWindower:
    """Windows of fixed `length` starting every `offset`, aligned to
    `align_to`; an item can fall in several windows. `offset` may not be
    longer than `length`.

    ```python
    windower = win.SlidingWindower(timedelta(minutes=1), timedelta(seconds=10), align)
    ```
    """

    length: timedelta
    offset: timedelta
    align_to: datetime
    def __init__(self, length: timedelta, offset: timedelta, align_to: datetime) -> None: ...

class SessionWindower:
    """Sessions of activity: a key's window stays open while items keep
    coming within `gap` of each other, and closes once the watermark is more
    than `gap` past its last item. Sessions that grow into each other merge.

    ```python
    windower = win.SessionWindower(gap=timedelta(minutes=5))
    ```
    """

    gap: timedelta
    def __init__(self, gap: timedelta) -> None: ...

class WindowMetadata:
    """When a window opened and closed (and, for sessions, which windows
    were merged into it). Emitted on a window operator's `meta` stream.

    ```python
    op.inspect("meta", out.meta)  # ('a', (0, WindowMetadata(open_time=..., close_time=...)))
    ```
    """

    open_time: datetime
    close_time: datetime
    merged_ids: set[int]
    def __init__(self, open_time: datetime, close_time: datetime, merged_ids: Iterable[int] | None = ...) -> None: ...

class WindowOut(NamedTuple, Generic[_V, _R]):
    """The three streams every window operator returns.

    ```python
    out = win.count_window("count", readings, clock, windower, lambda r: r["sensor"])
    op.output("counts", out.down, sinks.stdout())
    op.output("late", out.late, sinks.file("late.jsonl"))
    ```
    """

    down: Stream[tuple[str, tuple[int, _R]]]
    late: Stream[tuple[str, tuple[int, _V]]]
    meta: Stream[tuple[str, tuple[int, WindowMetadata]]]

# What the window operators accept as `clock` and `windower`.
_Clock = EventClock | SystemClock
_Windower = TumblingWindower | SlidingWindower | SessionWindower

def fold_window(
    step_id: str,
    up: Stream[tuple[str, _V]],
    clock: _Clock,
    windower: _Windower,
    builder: Callable[[], _A],
    folder: Callable[[_A, _V], _A],
    merger: Callable[[_A, _A], _A],
    ordered: bool = ...,
) -> WindowOut[_V, _A]:
    """Fold each window's values into an accumulator: `builder()` makes a new
    one, `folder(acc, value) -> acc` adds a value, `merger(acc, other) -> acc`
    combines two when session windows merge. With `ordered=True` values are
    folded in timestamp order.

    ```python
    out = win.fold_window("sum", keyed, clock, windower,
                          builder=lambda: 0.0,
                          folder=lambda acc, r: acc + r["kwh"],
                          merger=lambda a, b: a + b)
    ```
    """

def reduce_window(
    step_id: str, up: Stream[tuple[str, _V]], clock: _Clock, windower: _Windower, reducer: Callable[[_V, _V], _V]
) -> WindowOut[_V, _V]:
    """Combine each window's values pairwise with `reducer(a, b) -> a`.

    ```python
    out = win.reduce_window("longest", keyed, clock, windower,
                            lambda a, b: a if len(a) >= len(b) else b)
    ```
    """

def collect_window(
    step_id: str,
    up: Stream[tuple[str, _V]],
    clock: _Clock,
    windower: _Windower,
    into: type[list[Any]] | type[set[Any]] | type[dict[Any, Any]] = ...,
    ordered: bool = ...,
) -> WindowOut[_V, Any]:
    """Collect each window's values into a `list` (in timestamp order), a
    `set`, or a `dict` (values must be `(key, value)` 2-tuples).

    ```python
    out = win.collect_window("all", keyed, clock, windower)
    ```
    """

def count_window(
    step_id: str, up: Stream[_X], clock: _Clock, windower: _Windower, key: str | Callable[[_X], str]
) -> WindowOut[_X, int]:
    """Count the items of each key in each window. `up` is not keyed:
    `key(item) -> str` (or a field name) picks the key. Counting runs in Rust.

    ```python
    out = win.count_window("per_sensor", readings, clock, windower, "sensor")
    ```
    """

def max_window(
    step_id: str, up: Stream[tuple[str, _V]], clock: _Clock, windower: _Windower, by: Callable[[_V], Any] = ...
) -> WindowOut[_V, _V]:
    """Emit each window's largest value, compared by `by(value)`.

    ```python
    out = win.max_window("hottest", keyed, clock, windower, by=lambda r: r["temp"])
    ```
    """

def min_window(
    step_id: str, up: Stream[tuple[str, _V]], clock: _Clock, windower: _Windower, by: Callable[[_V], Any] = ...
) -> WindowOut[_V, _V]:
    """Emit each window's smallest value, compared by `by(value)`.

    ```python
    out = win.min_window("coldest", keyed, clock, windower, by=lambda r: r["temp"])
    ```
    """

def aggregate(
    step_id: str,
    up: Stream[tuple[str, Any]],
    clock: _Clock,
    windower: _Windower,
    fields: Mapping[str, str | Iterable[str]],
) -> WindowOut[Any, dict[str, dict[str, float | None]]]:
    """Compute statistics of numeric fields per key and window, in Rust.

    `fields` maps a field name of dict values to the statistics wanted:
    `count`, `sum`, `mean`, `min`, `max`, `stddev` (population), `first`,
    `last` (by timestamp), `p50`, `p90`, `p99` (nearest-rank percentiles).
    Values that are missing or not numbers are left out of that field's
    statistics. Each down item is
    `(key, (window_id, {"temp": {"mean": 21.5, "max": 23.0}}))`; a statistic
    of a field without values is `None` (its `count` is 0, its `sum` 0.0).

    With a field-name key (`op.key_on(..., "sensor")`) and a field-name
    clock, no Python runs per item.

    ```python
    out = win.aggregate("stats", keyed, clock, windower,
                        {"temp": ["mean", "min", "max", "p90"], "rh": ["mean"]})
    ```
    """
