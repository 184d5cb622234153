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

from datetime import datetime, timedelta
from functools import partial
# Not typing.NamedTuple: importing typing costs every agent 1.4 MiB.
from collections import namedtuple as _namedtuple

from runnel import Stream, _caller_location

__all__ = [
    "EventClock", "SystemClock", "TumblingWindower", "SlidingWindower",
    "SessionWindower", "WindowMetadata", "WindowOut", "fold_window",
    "reduce_window", "collect_window", "count_window", "max_window",
    "min_window", "aggregate",
]

_UNITS = ("s", "ms", "us", "ns", "iso8601")
_STATS = ("count", "sum", "mean", "min", "max", "stddev", "first", "last", "p50", "p90", "p99")


def _require_aware(what, dt):
    if not isinstance(dt, datetime) or dt.tzinfo is None:
        raise TypeError(f"{what} must be a timezone-aware datetime (e.g. tzinfo=timezone.utc); got {dt!r}")


def _require_td(what, td, allow_zero=True):
    if not isinstance(td, timedelta):
        raise TypeError(f"{what} must be a timedelta; got {td!r}")
    if td < timedelta(0) or (not allow_zero and td == timedelta(0)):
        raise ValueError(f"{what} must be {'non-negative' if allow_zero else 'positive'}; got {td!r}")


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

    def __init__(self, ts_getter, wait_for_system_duration: timedelta, unit: str = "s"):
        if not (isinstance(ts_getter, str) or callable(ts_getter)):
            raise TypeError(f"EventClock `ts_getter` must be a function or a field name; got {ts_getter!r}")
        _require_td("EventClock `wait_for_system_duration`", wait_for_system_duration)
        if unit not in _UNITS:
            raise ValueError(f"EventClock `unit` must be one of {', '.join(_UNITS)}; got {unit!r}")
        self.ts_getter = ts_getter
        self.wait_for_system_duration = wait_for_system_duration
        self.unit = unit

    def __repr__(self):
        return f"EventClock({self.ts_getter!r}, {self.wait_for_system_duration!r}, unit={self.unit!r})"


class SystemClock:
    """Use the system's UTC time when an item is processed as its timestamp.
    No item is ever late.

    ```python
    clock = win.SystemClock()
    ```
    """

    def __repr__(self):
        return "SystemClock()"


class TumblingWindower:
    """Back-to-back windows of fixed `length`, aligned to `align_to`.

    ```python
    from datetime import datetime, timedelta, timezone
    align = datetime(2024, 1, 1, tzinfo=timezone.utc)
    windower = win.TumblingWindower(length=timedelta(seconds=10), align_to=align)
    ```
    """

    def __init__(self, length: timedelta, align_to: datetime):
        _require_td("TumblingWindower `length`", length, allow_zero=False)
        _require_aware("TumblingWindower `align_to`", align_to)
        self.length = length
        self.align_to = align_to

    def __repr__(self):
        return f"TumblingWindower({self.length!r}, {self.align_to!r})"


class SlidingWindower:
    """Windows of fixed `length` starting every `offset`, aligned to
    `align_to`; an item can fall in several windows. `offset` may not be
    longer than `length`.

    ```python
    windower = win.SlidingWindower(timedelta(minutes=1), timedelta(seconds=10), align)
    ```
    """

    def __init__(self, length: timedelta, offset: timedelta, align_to: datetime):
        _require_td("SlidingWindower `length`", length, allow_zero=False)
        _require_td("SlidingWindower `offset`", offset, allow_zero=False)
        _require_aware("SlidingWindower `align_to`", align_to)
        if offset > length:
            raise ValueError(
                "sliding window `offset` can't be longer than `length`; "
                "there would be undefined gaps between windows"
            )
        self.length = length
        self.offset = offset
        self.align_to = align_to

    def __repr__(self):
        return f"SlidingWindower({self.length!r}, {self.offset!r}, {self.align_to!r})"


class SessionWindower:
    """Sessions of activity: a key's window stays open while items keep
    coming within `gap` of each other, and closes once the watermark is more
    than `gap` past its last item. Sessions that grow into each other merge.

    ```python
    windower = win.SessionWindower(gap=timedelta(minutes=5))
    ```
    """

    def __init__(self, gap: timedelta):
        _require_td("session window `gap`", gap)
        self.gap = gap

    def __repr__(self):
        return f"SessionWindower({self.gap!r})"


class WindowMetadata:
    """When a window opened and closed (and, for sessions, which windows
    were merged into it). Emitted on a window operator's `meta` stream.

    ```python
    op.inspect("meta", out.meta)  # ('a', (0, WindowMetadata(open_time=..., close_time=...)))
    ```
    """

    __slots__ = ("open_time", "close_time", "merged_ids")

    def __init__(self, open_time: datetime, close_time: datetime, merged_ids=None):
        self.open_time = open_time
        self.close_time = close_time
        self.merged_ids = set(merged_ids) if merged_ids is not None else set()

    def __eq__(self, other):
        return (
            isinstance(other, WindowMetadata)
            and self.open_time == other.open_time
            and self.close_time == other.close_time
            and self.merged_ids == other.merged_ids
        )

    def __repr__(self):
        return f"WindowMetadata(open_time={self.open_time!r}, close_time={self.close_time!r}, merged_ids={self.merged_ids!r})"


class WindowOut(_namedtuple("WindowOut", ["down", "late", "meta"])):
    """The three streams every window operator returns.

    ```python
    out = win.count_window("count", readings, clock, windower, lambda r: r["sensor"])
    op.output("counts", out.down, sinks.stdout())
    op.output("late", out.late, sinks.file("late.jsonl"))
    ```
    """

    __slots__ = ()


def _check_clock_windower(step_id, clock, windower):
    if not isinstance(clock, (EventClock, SystemClock)):
        raise TypeError(f"window step {step_id!r} at {_caller_location()}: `clock` must be win.EventClock or win.SystemClock; got {clock!r}")
    if not isinstance(windower, (TumblingWindower, SlidingWindower, SessionWindower)):
        raise TypeError(f"window step {step_id!r} at {_caller_location()}: `windower` must be a win.*Windower; got {windower!r}")


def _window(step_id, up, clock, windower, logic, ordered, **params):
    _check_clock_windower(step_id, clock, windower)
    if not isinstance(up, Stream):
        raise TypeError(f"window step {step_id!r} at {_caller_location()}: `up` must be a Stream; got {type(up).__name__}")
    params.update(clock=clock, windower=windower, logic=logic, ordered=bool(ordered))
    down, late, meta = up.flow._add_step("window", step_id, [up], 3, params)
    return WindowOut(down, late, meta)


def _check_fns(step_id, **fns):
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"window step {step_id!r} at {_caller_location()}: `{name}` must be callable; got {fn!r}")


def fold_window(step_id: str, up: Stream, clock, windower, builder, folder, merger, ordered: bool = True) -> WindowOut:
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
    _check_fns(step_id, builder=builder, folder=folder, merger=merger)
    return _window(step_id, up, clock, windower, "fold", ordered, builder=builder, folder=folder, merger=merger)


def _untyped_none():
    return None


def reduce_window(step_id: str, up: Stream, clock, windower, reducer) -> WindowOut:
    """Combine each window's values pairwise with `reducer(a, b) -> a`.

    ```python
    out = win.reduce_window("longest", keyed, clock, windower,
                            lambda a, b: a if len(a) >= len(b) else b)
    ```
    """
    _check_fns(step_id, reducer=reducer)

    def shim_folder(s, v):
        return v if s is None else reducer(s, v)

    return _window(step_id, up, clock, windower, "fold", False, builder=_untyped_none, folder=shim_folder, merger=reducer)


def _collect_list_folder(s, v):
    s.append(v)
    return s


def _collect_set_folder(s, v):
    s.add(v)
    return s


def _collect_dict_merger(a, b):
    a.update(b)
    return a


def collect_window(step_id: str, up: Stream, clock, windower, into=list, ordered: bool = True) -> WindowOut:
    """Collect each window's values into a `list` (in timestamp order), a
    `set`, or a `dict` (values must be `(key, value)` 2-tuples).

    ```python
    out = win.collect_window("all", keyed, clock, windower)
    ```
    """
    if isinstance(into, type) and issubclass(into, list):
        b, f, m = list, _collect_list_folder, list.__add__
    elif isinstance(into, type) and issubclass(into, set):
        b, f, m = set, _collect_set_folder, set.union
    elif isinstance(into, type) and issubclass(into, dict):
        def f(d, k_v):
            try:
                k, v = k_v
            except (TypeError, ValueError) as ex:
                raise TypeError(
                    f"step {step_id!r} collecting into a `dict` requires `(key, value)` "
                    f"2-tuples as the values in the stream; got a {type(k_v)!r} instead"
                ) from ex
            d[k] = v
            return d

        b, m = dict, _collect_dict_merger
    else:
        raise TypeError(f"`collect_window` {step_id!r} supports only `list`, `set` and `dict`; got {into!r}")
    return _window(step_id, up, clock, windower, "fold", ordered, builder=b, folder=f, merger=m)


def count_window(step_id: str, up: Stream, clock, windower, key) -> WindowOut:
    """Count the items of each key in each window. `up` is not keyed:
    `key(item) -> str` (or a field name) picks the key. Counting runs in Rust.

    ```python
    out = win.count_window("per_sensor", readings, clock, windower, "sensor")
    ```
    """
    from runnel import op

    keyed = op.key_on(f"{step_id}.keyed", up, key)
    return _window(step_id, keyed, clock, windower, "count", False)


def _identity(x):
    return x


def max_window(step_id: str, up: Stream, clock, windower, by=_identity) -> WindowOut:
    """Emit each window's largest value, compared by `by(value)`.

    ```python
    out = win.max_window("hottest", keyed, clock, windower, by=lambda r: r["temp"])
    ```
    """
    return reduce_window(step_id, up, clock, windower, partial(max, key=by))


def min_window(step_id: str, up: Stream, clock, windower, by=_identity) -> WindowOut:
    """Emit each window's smallest value, compared by `by(value)`.

    ```python
    out = win.min_window("coldest", keyed, clock, windower, by=lambda r: r["temp"])
    ```
    """
    return reduce_window(step_id, up, clock, windower, partial(min, key=by))


def aggregate(step_id: str, up: Stream, clock, windower, fields: dict) -> WindowOut:
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
    where = _caller_location()
    if not isinstance(fields, dict) or not fields:
        raise TypeError(f"win.aggregate {step_id!r} at {where}: `fields` must be a non-empty dict of field name -> list of statistics")
    spec = {}
    for name, stats in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"win.aggregate {step_id!r} at {where}: field names must be str; got {name!r}")
        if isinstance(stats, str):
            stats = [stats]
        stats = list(stats)
        for s in stats:
            if s not in _STATS:
                raise ValueError(f"win.aggregate {step_id!r} at {where}: unknown statistic {s!r} for field {name!r}; choose from {', '.join(_STATS)}")
        if not stats:
            raise ValueError(f"win.aggregate {step_id!r} at {where}: field {name!r} asks for no statistics")
        spec[name] = stats
    return _window(step_id, up, clock, windower, "aggregate", True, spec=spec)
