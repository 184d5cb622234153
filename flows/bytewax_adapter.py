"""Run a runnel flow file on real Bytewax (0.21).

A runnel flow file imports `runnel` (`from runnel import Dataflow, op, win,
sources, sinks`). This adapter installs a stand-in `runnel` package whose
functions have the same names and signatures but build a
`bytewax.dataflow.Dataflow` instead, then executes the flow file. Use it to
check runnel's results against Bytewax, or to move a flow onto a Bytewax
cluster unchanged. It needs only Bytewax 0.21 and this one file.

Oracle: print what each output step receives
--------------------------------------------
Same contract as `runnel replay`::

    python flows/bytewax_adapter.py FLOW.py [--input [STEP=]FILE ...] [--keep-sinks]
                                    [--freeze-clock] [--batch-size N]

Every item reaching an `op.output` step is printed on stdout as one line
`{"step": "<output step id>", "item": <item as JSON>}`. `--input STEP=FILE`
feeds input step STEP from FILE instead of its `sources.file` path (FILE is
read as CSV if it ends in `.csv`, else as JSON lines; without `STEP=` it
feeds the flow's only input step). `--keep-sinks` writes each output's items
to the flow's own sink instead. The flow runs in one worker with
`bytewax.testing.run_main`; anything the flow's own Python code prints goes
to stderr so stdout holds only the replay lines. Within the `op.collect`
step the system-time `timeout` is ignored (only `max_size` and end of input
emit lists), as in `runnel replay`. `--freeze-clock` stops EventClock
watermarks from advancing with system time during the run, which is how
`runnel replay` treats time; without it, items within a few milliseconds of
the late boundary may go either way. `--batch-size N` sets how many input
items Bytewax processes at once (default 1).

Cluster: run the flow with `bytewax.run`
----------------------------------------
`load(flow_path, inputs=None)` returns the Bytewax dataflow, with the flow's
own sinks (`sinks.stdout()`: one JSON line per item on stdout;
`sinks.file(path)`: JSON lines appended to the file). `bytewax.run` accepts a
factory call with literal arguments after the colon::

    python -m bytewax.run "flows/bytewax_adapter:load('flows/demo.py')"
    python -m bytewax.run -w 2 \\
        "flows/bytewax_adapter:load('flows/demo.py', {'in': 'today.jsonl'})"

(The flow path may not contain a `:`. Relative paths in `inputs` are relative
to the current directory, those inside the flow file relative to the flow
file's folder.) Each input file is one partition, read by one worker; keyed
steps spread over all workers as usual. `python -m bytewax.testing` takes the
same argument and `-p`/`-w` to try several processes and workers locally.

A flow file must create exactly one `Dataflow`, and (a Bytewax rule) have at
least one `op.output` or `op.inspect` step.

What maps onto what
-------------------
Operators that take Python functions map one-to-one onto the Bytewax
operators of the same name. runnel's native fast paths are emulated in
Python with the semantics runnel implements in Rust:

- `op.key_on(step, up, "field")`: key = `item[field]` if it is a `str`,
  `str(v)` if it is an `int` (not `bool`); other items are dropped.
- `win.EventClock("field", wait, unit=...)`: the timestamp is read from the
  value's field (`"s"`, `"ms"`, `"us"`, `"ns"` since the Unix epoch; integers
  exact (ns floored), floats rounded half-even to whole microseconds; or `"iso8601"` text, UTC if it has no offset).
  Values whose timestamp is missing or unreadable are dropped before the
  window: they are neither windowed nor late.
- `win.aggregate(...)`: a `fold_window` with `ordered=True` and an
  accumulator computing count/sum/mean/min/max/stddev/first/last/p50/p90/p99.
- `win.count_window(..., key="field")`: field key as above, then Bytewax's
  counting fold.

Differences from runnel that are Bytewax's own: an exception raised by a
flow's function stops the dataflow (runnel skips the item and counts it);
keys returned by a `key_on` function must be `str`; step and flow ids may not
contain `.` (the adapter replaces `.` with `_` in the ids it gives Bytewax,
replay lines keep the original ids); Bytewax's EventClock watermark also
advances with system time while a run lasts.
"""

import argparse
import contextlib
import csv
import json
import math
import os
import re
import sys
import types
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from functools import partial
from typing import Any, NamedTuple

import bytewax.operators as bop
import bytewax.operators.windowing as bwin
from bytewax.dataflow import Dataflow as _BwDataflow
from bytewax.dataflow import Stream as _BwStream
from bytewax.dataflow import operator as _bw_operator
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

__all__ = ["load", "to_json", "read_records", "main", "FlowError"]

_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Skipped records and items, by reason; printed to stderr after an oracle run.
SKIPPED = {}


def _skip(reason):
    SKIPPED[reason] = SKIPPED.get(reason, 0) + 1


# ---------------------------------------------------------------------------
# JSON conversion of items (shared with `runnel replay` and runnel's sinks)
# ---------------------------------------------------------------------------


def _json_text(v):
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def to_json(obj):
    """Convert an item to JSON-ready data, exactly as runnel does.

    None/bool/int/str as is; floats as is except NaN/inf -> None; tuples and
    lists -> lists; dicts -> dicts with `str(key)` for non-str keys;
    datetimes -> UTC ISO 8601 text; WindowMetadata -> {"open_time",
    "close_time", "merged_ids" (sorted)}; sets -> lists sorted by the JSON
    text of each element; timedeltas -> seconds as float; anything else ->
    `repr(obj)`.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (tuple, list)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): to_json(v) for k, v in obj.items()}
    if isinstance(obj, datetime):
        return obj.astimezone(timezone.utc).isoformat()
    if isinstance(obj, bwin.WindowMetadata):
        return {
            "open_time": to_json(obj.open_time),
            "close_time": to_json(obj.close_time),
            "merged_ids": sorted(obj.merged_ids),
        }
    if isinstance(obj, (set, frozenset)):
        return sorted((to_json(v) for v in obj), key=_json_text)
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    return repr(obj)


# ---------------------------------------------------------------------------
# Decoding input files (as runnel's sources.file does)
# ---------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def _csv_cell(s):
    if s == "":
        return None
    if _INT_RE.match(s):
        return int(s)
    if _FLOAT_RE.match(s):
        return float(s)
    return s


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _warn(msg):
    print(f"bytewax_adapter: {msg}", file=sys.stderr)


def read_records(path, decode):
    """Yield the items of a file decoded as `"jsonl"` or `"csv"`.

    jsonl: one JSON value per line; blank lines skipped; malformed or
    non-UTF-8 lines skipped with a warning. csv: the first row is the header,
    each further row a dict; cells that read as ints/floats become numbers,
    empty cells None; rows with the wrong number of cells are skipped.
    """
    if decode == "jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    _skip("input: non-UTF-8 line")
                    _warn(f"{path}:{lineno}: skipped non-UTF-8 line")
                    continue
                if not text.strip():
                    continue
                try:
                    item = json.loads(text, parse_constant=_reject_constant)
                except ValueError as ex:
                    _skip("input: malformed JSON line")
                    _warn(f"{path}:{lineno}: skipped malformed JSON line: {ex}")
                    continue
                yield item
    elif decode == "csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = csv.reader(f)
            header = None
            for row in rows:
                if not row:
                    continue
                if header is None:
                    header = row
                    continue
                if len(row) != len(header) or any("\udc80" <= c <= "\udcff" for cell in row for c in cell):
                    _skip("input: malformed CSV row")
                    _warn(f"{path}:{rows.line_num}: skipped malformed CSV row")
                    continue
                yield {h: _csv_cell(cell) for h, cell in zip(header, row)}
    else:
        raise ValueError(f"unknown decode {decode!r}")


def _decode_for(path):
    return "csv" if path.lower().endswith(".csv") else "jsonl"


class _FilePartition(StatefulSourcePartition):
    def __init__(self, path, decode, batch_size, resume_at):
        self._it = read_records(path, decode)
        self._batch_size = batch_size
        self._pos = 0
        while self._pos < (resume_at or 0):
            next(self._it, None)
            self._pos += 1

    def next_batch(self):
        batch = []
        for item in self._it:
            batch.append(item)
            if len(batch) >= self._batch_size:
                break
        if not batch:
            raise StopIteration()
        self._pos += len(batch)
        return batch

    def snapshot(self):
        return self._pos


class _FileSource(FixedPartitionedSource):
    """One partition: the whole file, read by one worker."""

    def __init__(self, step_id, declared):
        self.step_id = step_id
        self.declared = declared  # the runnel sources.file(...) object
        self.path = None  # set once the flow file has run
        self.decode = None
        self.batch_size = 1

    def list_parts(self):
        return [self.step_id]

    def build_part(self, step_id, for_part, resume_state):
        return _FilePartition(self.path, self.decode, self.batch_size, resume_state)


# ---------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------


class _LinesPartition(StatelessSinkPartition):
    def __init__(self, fmt, out_getter, closer=None):
        self._fmt = fmt
        self._out_getter = out_getter
        self._closer = closer

    def write_batch(self, items):
        out = self._out_getter()
        for item in items:
            out.write(self._fmt(item) + "\n")
        out.flush()

    def close(self):
        if self._closer is not None:
            self._closer()


class _ReplaySink(DynamicSink):
    """`{"step": ..., "item": ...}` lines, as `runnel replay` prints them."""

    def __init__(self, step_id, out):
        self.step_id = step_id
        self.out = out

    def build(self, step_id, worker_index, worker_count):
        sid = self.step_id
        return _LinesPartition(lambda item: _json_text({"step": sid, "item": to_json(item)}), lambda: self.out)


class _StdoutJsonSink(DynamicSink):
    """runnel's `sinks.stdout()`: one JSON line per item."""

    def __init__(self, out=None):
        self.out = out

    def build(self, step_id, worker_index, worker_count):
        return _LinesPartition(lambda item: _json_text(to_json(item)), lambda: self.out or sys.stdout)


class _FileJsonSink(DynamicSink):
    """runnel's `sinks.file(path)`: JSON lines appended to the file."""

    def __init__(self, path):
        self.path = path

    def build(self, step_id, worker_index, worker_count):
        f = open(self.path, "a", encoding="utf-8")
        return _LinesPartition(lambda item: _json_text(to_json(item)), lambda: f, f.close)


# ---------------------------------------------------------------------------
# Emulation of runnel's native fast paths
# ---------------------------------------------------------------------------


def _field_key(field, item):
    """runnel's field key: str as is, int (not bool) -> str, else None."""
    if not isinstance(item, dict):
        return None
    v = item.get(field)
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def _keyed_by_field(field, item):
    k = _field_key(field, item)
    if k is None:
        _skip(f"key_on: no str/int field {field!r}")
        return None
    return (k, item)


_F64_PER_US = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}
_UNIT_PER_US = {"s": Fraction(10**6), "ms": Fraction(10**3), "us": Fraction(1), "ns": Fraction(1, 10**3)}
_ISO_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:?\d{2})?\Z"
)


def _parse_iso8601(s):
    """RFC 3339 / ISO 8601 date-time text -> UTC datetime, or None.

    `T`, `t` or a space between date and time; fraction truncated to whole
    microseconds; offset `Z`, `+HH:MM` or `+HHMM`, none meaning UTC; a leap
    second (`:60`) reads as the first second of the next minute.
    """
    m = _ISO_RE.match(s)
    if m is None:
        return None
    date, hh, mm, ss, frac, off = m.groups()
    leap = ss == "60"
    if leap:
        ss = "59"
    frac = ((frac or "") + "000000")[:6]  # truncate to whole microseconds
    if off is None or off in ("Z", "z"):
        off = "+00:00"
    elif ":" not in off:
        off = f"{off[:3]}:{off[3:]}"
    try:
        dt = datetime.fromisoformat(f"{date}T{hh}:{mm}:{ss}.{frac}{off}").astimezone(timezone.utc)
        return dt + timedelta(seconds=1) if leap else dt
    except (ValueError, OverflowError):
        return None


def _field_timestamp(field, unit, value):
    """The timestamp runnel reads from `value[field]`, or None."""
    if not isinstance(value, dict):
        return None
    v = value.get(field)
    if unit == "iso8601":
        return _parse_iso8601(v) if isinstance(v, str) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, int):
        micros = math.floor(Fraction(v) * _UNIT_PER_US[unit])
    else:
        # Floats: scaled in double precision, then rounded half to even, as
        # datetime.fromtimestamp rounds (and as runnel does).
        micros = round(v * _F64_PER_US[unit])
    try:
        return _UTC_EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        return None


def _has_field_timestamp(field, unit, value):
    if _field_timestamp(field, unit, value) is None:
        _skip(f"EventClock: no readable timestamp in field {field!r}")
        return False
    return True


_STATS = ("count", "sum", "mean", "min", "max", "stddev", "first", "last", "p50", "p90", "p99")
_PCT = {"p50": 50, "p90": 90, "p99": 99}


def _counted(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return math.isfinite(v)


class AggregateAcc:
    """`win.aggregate`'s accumulator: per field `[count, sum, values]` with
    values in fold order (timestamp order; ties in arrival order)."""

    __slots__ = ("fields",)

    def __init__(self, names):
        self.fields = {name: [0, 0.0, []] for name in names}

    def __getstate__(self):
        return self.fields

    def __setstate__(self, state):
        self.fields = state


def _agg_build(names):
    return AggregateAcc(names)


def _agg_fold(acc, value):
    if isinstance(value, dict):
        for name, st in acc.fields.items():
            v = value.get(name)
            if _counted(v):
                st[0] += 1
                st[1] += v
                st[2].append(v)
    return acc


def _agg_merge(older, newer):
    # Session merge: `older` is the target (earlier-opened) window, `newer`
    # the window merged into it. Counts and sums add, values concatenate, so
    # first = older's first if any else newer's, last = newer's last if any
    # else older's.
    for name, st in older.fields.items():
        other = newer.fields[name]
        st[0] += other[0]
        st[1] += other[1]
        st[2].extend(other[2])
    return older


def _agg_stat(stat, count, total, values):
    if stat == "count":
        return count
    if stat == "sum":
        return float(total)
    if count == 0:
        return None
    if stat == "mean":
        return total / count
    if stat == "min":
        return float(min(values))
    if stat == "max":
        return float(max(values))
    if stat == "stddev":
        mean = total / count
        return math.sqrt(sum((float(x) - mean) ** 2 for x in values) / count)
    if stat == "first":
        return values[0]
    if stat == "last":
        return values[-1]
    p = _PCT[stat]
    k = math.ceil(p / 100 * count)
    return float(sorted(values)[k - 1])


def _agg_finish(spec, wid_acc):
    window_id, acc = wid_acc
    out = {}
    for name, stats in spec.items():
        count, total, values = acc.fields[name]
        out[name] = {stat: _agg_stat(stat, count, total, values) for stat in stats}
    return (window_id, out)


def _count_build():
    return 0


def _count_fold(s, _v):
    return s + 1


def _count_merge(s, t):
    return s + t


# ---------------------------------------------------------------------------
# The stand-in `runnel` package
# ---------------------------------------------------------------------------


class _Plan:
    """What one execution of a flow file built, and how to run it."""

    def __init__(self, flow_path, replay_out, keep_sinks, batch_size):
        self.flow_path = os.path.abspath(flow_path)
        self.flow_dir = os.path.dirname(self.flow_path)
        self.replay_out = replay_out  # file for replay lines, or None (cluster)
        self.keep_sinks = keep_sinks
        self.batch_size = batch_size
        self.stdout = None  # where sinks.stdout() writes; None: sys.stdout
        self.frozen_now = None  # fixed "system time" for EventClocks, or None
        self.flows = []
        self.inputs = []  # _FileSource, in creation order
        self.outputs = []  # runnel output step ids

    def resolve(self, path):
        return path if os.path.isabs(path) else os.path.join(self.flow_dir, path)


_PLAN = None  # the _Plan of the flow file being executed


def _bw_id(step_id):
    if not isinstance(step_id, str) or not step_id:
        raise TypeError(f"step id must be a non-empty str; got {step_id!r}")
    return step_id.replace(".", "_")


def _check_fn(step_id, name, fn):
    if not callable(fn):
        raise TypeError(f"step {step_id!r}: `{name}` must be callable; got {type(fn).__name__}")


def _build_runnel_modules():
    """Make module objects runnel, runnel.op, runnel.win, runnel.sources and
    runnel.sinks with runnel's public names."""

    # -- runnel ------------------------------------------------------------
    class Dataflow(_BwDataflow):
        """runnel.Dataflow: a Bytewax Dataflow (`.` in the id becomes `_`)."""

        def __init__(self, flow_id, substeps=None, _scope=None):
            if not isinstance(flow_id, str) or not flow_id:
                raise TypeError(f"Dataflow id must be a non-empty str; got {flow_id!r}")
            super().__init__(flow_id.replace(".", "_"), [] if substeps is None else substeps, _scope)
            if _scope is None and _PLAN is not None:
                _PLAN.flows.append(self)
                runnel._created.append(self)

    # -- runnel.sources ------------------------------------------------------
    class Source:
        kind = "?"

    class _SourceFile(Source):
        kind = "file"

        def __init__(self, path, decode):
            self.path = path
            self.decode = decode

        def __repr__(self):
            return f"sources.file({self.path!r}, decode={self.decode!r})"

    def source_file(path: str, decode: str = None) -> Source:
        if not isinstance(path, str) or not path:
            raise TypeError(f"sources.file: `path` must be a non-empty str; got {path!r}")
        if decode is None:
            decode = _decode_for(path)
        if decode not in ("jsonl", "csv"):
            raise ValueError(f"sources.file({path!r}): `decode` must be one of jsonl, csv; got {decode!r}")
        return _SourceFile(os.fspath(path), decode)

    # -- runnel.sinks --------------------------------------------------------
    class Sink:
        kind = "?"

    class _SinkStdout(Sink):
        kind = "stdout"

        def __repr__(self):
            return "sinks.stdout()"

    class _SinkFile(Sink):
        kind = "file"

        def __init__(self, path):
            self.path = path

        def __repr__(self):
            return f"sinks.file({self.path!r})"

    def sink_stdout() -> Sink:
        return _SinkStdout()

    def sink_file(path: str) -> Sink:
        if not isinstance(path, str) or not path:
            raise TypeError(f"sinks.file: `path` must be a non-empty str; got {path!r}")
        return _SinkFile(path)

    # -- runnel.op -----------------------------------------------------------
    class BranchOut(NamedTuple):
        trues: Any
        falses: Any

    def op_input(step_id: str, flow, source):
        if not isinstance(flow, _BwDataflow):
            raise TypeError(f"op.input {step_id!r}: `flow` must be a Dataflow; got {type(flow).__name__}")
        if not isinstance(source, Source):
            raise TypeError(f"op.input {step_id!r}: `source` must come from runnel.sources; got {type(source).__name__}")
        src = _FileSource(step_id, source)
        _PLAN.inputs.append(src)
        return bop.input(_bw_id(step_id), flow, src)

    def op_output(step_id: str, up, sink) -> None:
        if not isinstance(sink, Sink):
            raise TypeError(f"op.output {step_id!r}: `sink` must come from runnel.sinks; got {type(sink).__name__}")
        if isinstance(sink, _SinkFile):
            real = _FileJsonSink(_PLAN.resolve(sink.path))
        else:
            real = _StdoutJsonSink(_PLAN.stdout)
        if _PLAN.replay_out is None or _PLAN.keep_sinks:
            bw_sink = real
        else:
            bw_sink = _ReplaySink(step_id, _PLAN.replay_out)
        _PLAN.outputs.append(step_id)
        bop.output(_bw_id(step_id), up, bw_sink)

    def op_map(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.map(_bw_id(step_id), up, mapper)

    def op_filter(step_id: str, up, predicate):
        _check_fn(step_id, "predicate", predicate)
        return bop.filter(_bw_id(step_id), up, predicate)

    def op_filter_map(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.filter_map(_bw_id(step_id), up, mapper)

    def op_flat_map(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.flat_map(_bw_id(step_id), up, mapper)

    def op_flat_map_batch(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.flat_map_batch(_bw_id(step_id), up, mapper)

    def op_key_on(step_id: str, up, key):
        if isinstance(key, str):
            return _key_on_field(_bw_id(step_id), up, key)
        _check_fn(step_id, "key", key)
        return bop.key_on(_bw_id(step_id), up, key)

    def op_key_rm(step_id: str, up):
        return bop.key_rm(_bw_id(step_id), up)

    def op_map_value(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.map_value(_bw_id(step_id), up, mapper)

    def op_filter_value(step_id: str, up, predicate):
        _check_fn(step_id, "predicate", predicate)
        return bop.filter_value(_bw_id(step_id), up, predicate)

    def op_flat_map_value(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.flat_map_value(_bw_id(step_id), up, mapper)

    def op_branch(step_id: str, up, predicate):
        _check_fn(step_id, "predicate", predicate)
        out = bop.branch(_bw_id(step_id), up, predicate)
        return BranchOut(out.trues, out.falses)

    def op_merge(step_id: str, *ups):
        if not ups:
            raise TypeError(f"op.merge {step_id!r}: needs at least one stream")
        return bop.merge(_bw_id(step_id), *ups)

    def _default_inspector(step_id, item):
        print(f"{step_id}: {item!r}", flush=True)

    def op_inspect(step_id: str, up, inspector=_default_inspector):
        _check_fn(step_id, "inspector", inspector)
        # Bytewax passes its fully qualified id "<flow id>.<step id>", as
        # runnel does; the Bytewax step id here may be mangled, so rebuild it.
        bw_id = _bw_id(step_id)

        def shim(fq_id, item):
            flow_id = fq_id[: -len(bw_id) - 1] if fq_id.endswith("." + bw_id) else fq_id
            inspector(f"{flow_id}.{step_id}", item)

        return bop.inspect(bw_id, up, shim)

    def op_stateful_map(step_id: str, up, mapper):
        _check_fn(step_id, "mapper", mapper)
        return bop.stateful_map(_bw_id(step_id), up, mapper)

    def op_collect(step_id: str, up, timeout, max_size: int):
        if not isinstance(timeout, timedelta):
            raise TypeError(f"op.collect {step_id!r}: `timeout` must be a timedelta; got {timeout!r}")
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"op.collect {step_id!r}: `max_size` must be a positive int; got {max_size!r}")
        if _PLAN.replay_out is not None:
            timeout = timedelta(days=3650)  # replay: only max_size and EOF emit
        return bop.collect(_bw_id(step_id), up, timeout, max_size)

    # -- runnel.win ----------------------------------------------------------
    class EventClock:
        def __init__(self, ts_getter, wait_for_system_duration: timedelta, unit: str = "s"):
            if not (isinstance(ts_getter, str) or callable(ts_getter)):
                raise TypeError(f"EventClock `ts_getter` must be a function or a field name; got {ts_getter!r}")
            if not isinstance(wait_for_system_duration, timedelta) or wait_for_system_duration < timedelta(0):
                raise TypeError(f"EventClock `wait_for_system_duration` must be a non-negative timedelta; got {wait_for_system_duration!r}")
            if unit not in ("s", "ms", "us", "ns", "iso8601"):
                raise ValueError(f"EventClock `unit` must be one of s, ms, us, ns, iso8601; got {unit!r}")
            self.ts_getter = ts_getter
            self.wait_for_system_duration = wait_for_system_duration
            self.unit = unit

        def __repr__(self):
            return f"EventClock({self.ts_getter!r}, {self.wait_for_system_duration!r}, unit={self.unit!r})"

    class SystemClock:
        def __repr__(self):
            return "SystemClock()"

    def _require_aware(what, dt):
        if not isinstance(dt, datetime) or dt.tzinfo is None:
            raise TypeError(f"{what} must be a timezone-aware datetime; got {dt!r}")

    def _require_td(what, td, allow_zero=True):
        if not isinstance(td, timedelta):
            raise TypeError(f"{what} must be a timedelta; got {td!r}")
        if td < timedelta(0) or (not allow_zero and td == timedelta(0)):
            raise ValueError(f"{what} must be {'non-negative' if allow_zero else 'positive'}; got {td!r}")

    class TumblingWindower(bwin.TumblingWindower):
        def __init__(self, length: timedelta, align_to: datetime):
            _require_td("TumblingWindower `length`", length, allow_zero=False)
            _require_aware("TumblingWindower `align_to`", align_to)
            super().__init__(length, align_to)

    class SlidingWindower(bwin.SlidingWindower):
        def __init__(self, length: timedelta, offset: timedelta, align_to: datetime):
            _require_td("SlidingWindower `length`", length, allow_zero=False)
            _require_td("SlidingWindower `offset`", offset, allow_zero=False)
            _require_aware("SlidingWindower `align_to`", align_to)
            super().__init__(length, offset, align_to)

    class SessionWindower(bwin.SessionWindower):
        def __init__(self, gap: timedelta):
            _require_td("session window `gap`", gap)
            super().__init__(gap)

    class WindowOut(NamedTuple):
        down: Any
        late: Any
        meta: Any

    def _window(step_id, up, clock, windower, how, key=None):
        if not isinstance(clock, (EventClock, SystemClock)):
            raise TypeError(f"window step {step_id!r}: `clock` must be win.EventClock or win.SystemClock; got {clock!r}")
        if not isinstance(windower, bwin.Windower):
            raise TypeError(f"window step {step_id!r}: `windower` must be a win.*Windower; got {windower!r}")
        if not isinstance(up, _BwStream):
            raise TypeError(f"window step {step_id!r}: `up` must be a Stream; got {type(up).__name__}")
        out = _runnel_window(_bw_id(step_id), up, clock, windower, how, key)
        return WindowOut(out.down, out.late, out.meta)

    def fold_window(step_id: str, up, clock, windower, builder, folder, merger, ordered: bool = True):
        for name, fn in (("builder", builder), ("folder", folder), ("merger", merger)):
            _check_fn(step_id, name, fn)
        return _window(step_id, up, clock, windower,
                       partial(bwin.fold_window, builder=builder, folder=folder, merger=merger, ordered=ordered))

    def reduce_window(step_id: str, up, clock, windower, reducer):
        _check_fn(step_id, "reducer", reducer)
        return _window(step_id, up, clock, windower, partial(bwin.reduce_window, reducer=reducer))

    def collect_window(step_id: str, up, clock, windower, into=list, ordered: bool = True):
        if not (isinstance(into, type) and issubclass(into, (list, set, dict))):
            raise TypeError(f"`collect_window` {step_id!r} supports only `list`, `set` and `dict`; got {into!r}")
        return _window(step_id, up, clock, windower, partial(bwin.collect_window, into=into, ordered=ordered))

    def count_window(step_id: str, up, clock, windower, key):
        if not isinstance(key, str):
            _check_fn(step_id, "key", key)
        # Bytewax's count_window: key_on, then this fold with ordered=False.
        how = partial(bwin.fold_window, builder=_count_build, folder=_count_fold, merger=_count_merge, ordered=False)
        return _window(step_id, up, clock, windower, how, key=key)

    def _identity(x):
        return x

    def max_window(step_id: str, up, clock, windower, by=_identity):
        return _window(step_id, up, clock, windower, partial(bwin.max_window, by=by))

    def min_window(step_id: str, up, clock, windower, by=_identity):
        return _window(step_id, up, clock, windower, partial(bwin.min_window, by=by))

    def aggregate(step_id: str, up, clock, windower, fields: dict):
        if not isinstance(fields, dict) or not fields:
            raise TypeError(f"win.aggregate {step_id!r}: `fields` must be a non-empty dict of field name -> list of statistics")
        spec = {}
        for name, stats in fields.items():
            if not isinstance(name, str):
                raise TypeError(f"win.aggregate {step_id!r}: field names must be str; got {name!r}")
            stats = [stats] if isinstance(stats, str) else list(stats)
            for s in stats:
                if s not in _STATS:
                    raise ValueError(f"win.aggregate {step_id!r}: unknown statistic {s!r} for field {name!r}")
            if not stats:
                raise ValueError(f"win.aggregate {step_id!r}: field {name!r} asks for no statistics")
            spec[name] = stats
        how = partial(_aggregate_window, spec=spec)
        return _window(step_id, up, clock, windower, how)

    # -- assemble modules ----------------------------------------------------
    def module(name, doc, attrs):
        m = types.ModuleType(name, doc)
        for k, v in attrs.items():
            if callable(v) and getattr(v, "__module__", None) == __name__:
                try:
                    v.__module__ = name
                except (AttributeError, TypeError):
                    pass
            setattr(m, k, v)
        m.__all__ = [k for k in attrs if not k.startswith("_")]
        return m

    sources = module("runnel.sources", "runnel sources (Bytewax adapter)",
                     {"Source": Source, "file": source_file})
    sinks = module("runnel.sinks", "runnel sinks (Bytewax adapter)",
                   {"Sink": Sink, "stdout": sink_stdout, "file": sink_file})
    op = module("runnel.op", "runnel operators (Bytewax adapter)", {
        "BranchOut": BranchOut, "input": op_input, "output": op_output, "map": op_map,
        "filter": op_filter, "filter_map": op_filter_map, "flat_map": op_flat_map,
        "flat_map_batch": op_flat_map_batch, "key_on": op_key_on, "key_rm": op_key_rm,
        "map_value": op_map_value, "filter_value": op_filter_value,
        "flat_map_value": op_flat_map_value, "branch": op_branch, "merge": op_merge,
        "inspect": op_inspect, "stateful_map": op_stateful_map, "collect": op_collect,
    })
    for fn_name in op.__all__:
        fn = getattr(op, fn_name)
        if isinstance(fn, types.FunctionType):
            fn.__name__ = fn.__qualname__ = fn_name
    win = module("runnel.win", "runnel windowing (Bytewax adapter)", {
        "EventClock": EventClock, "SystemClock": SystemClock,
        "TumblingWindower": TumblingWindower, "SlidingWindower": SlidingWindower,
        "SessionWindower": SessionWindower, "WindowMetadata": bwin.WindowMetadata,
        "WindowOut": WindowOut, "fold_window": fold_window, "reduce_window": reduce_window,
        "collect_window": collect_window, "count_window": count_window,
        "max_window": max_window, "min_window": min_window, "aggregate": aggregate,
    })
    runnel = module("runnel", "runnel flow API on Bytewax (see bytewax_adapter.py)", {
        "Dataflow": Dataflow, "Stream": _BwStream, "op": op, "win": win,
        "sources": sources, "sinks": sinks,
    })
    runnel.__path__ = []
    runnel._created = []
    return {"runnel": runnel, "runnel.op": op, "runnel.win": win,
            "runnel.sources": sources, "runnel.sinks": sinks}


# Composite Bytewax operators; their inner steps are scoped under the
# runnel step id, so they never collide with the flow's own step ids.


@_bw_operator
def _key_on_field(step_id: str, up: _BwStream, field: str) -> _BwStream:
    return bop.filter_map("key_on_field", up, partial(_keyed_by_field, field))


def _event_clock(ts_getter, wait):
    if _PLAN is not None and _PLAN.frozen_now is not None:
        frozen = _PLAN.frozen_now
        return bwin.EventClock(ts_getter, wait, now_getter=lambda: frozen)
    return bwin.EventClock(ts_getter, wait)


@_bw_operator
def _runnel_window(step_id: str, up: _BwStream, clock: Any, windower: Any, how: Any, key: Any) -> bwin.WindowOut:
    if key is not None:
        if isinstance(key, str):
            up = bop.filter_map("keyed", up, partial(_keyed_by_field, key))
        else:
            up = bop.key_on("keyed", up, key)
    if not hasattr(clock, "ts_getter"):
        bw_clock = bwin.SystemClock()
    elif isinstance(clock.ts_getter, str):
        field, unit = clock.ts_getter, clock.unit
        up = bop.filter_value("has_timestamp", up, partial(_has_field_timestamp, field, unit))
        bw_clock = _event_clock(partial(_field_timestamp, field, unit), clock.wait_for_system_duration)
    else:
        bw_clock = _event_clock(clock.ts_getter, clock.wait_for_system_duration)
    return how("window", up, bw_clock, windower)


@_bw_operator
def _aggregate_window(step_id: str, up: _BwStream, clock: Any, windower: Any, spec: Any) -> bwin.WindowOut:
    out = bwin.fold_window("fold_window", up, clock, windower, partial(_agg_build, tuple(spec)),
                           _agg_fold, _agg_merge, ordered=True)
    down = bop.map_value("finish", out.down, partial(_agg_finish, spec))
    return bwin.WindowOut(down, out.late, out.meta)


# ---------------------------------------------------------------------------
# Loading a flow file
# ---------------------------------------------------------------------------


class FlowError(Exception):
    """The flow file or the inputs given for it don't fit together."""


def _normalize_inputs(inputs):
    if inputs is None:
        return {}
    if isinstance(inputs, (str, os.PathLike)):
        return {None: os.fspath(inputs)}
    return {k: os.fspath(v) for k, v in dict(inputs).items()}


def _build(flow_path, inputs, replay_out=None, keep_sinks=False, batch_size=1000, freeze_clock=False):
    global _PLAN
    inputs = _normalize_inputs(inputs)
    plan = _Plan(flow_path, replay_out, keep_sinks, batch_size)
    if freeze_clock:
        plan.frozen_now = datetime.now(timezone.utc)
    if replay_out is not None:
        plan.stdout = replay_out
    with open(plan.flow_path, encoding="utf-8") as f:
        code = compile(f.read(), plan.flow_path, "exec")
    # The stand-in modules stay installed: flow functions may import runnel
    # lazily while the dataflow runs.
    sys.modules.update(_build_runnel_modules())
    if plan.flow_dir not in sys.path:
        sys.path.insert(0, plan.flow_dir)
    _PLAN = plan
    try:
        exec(code, {"__name__": "__runnel_flow__", "__file__": plan.flow_path, "__builtins__": __builtins__})
    finally:
        _PLAN = None
    if len(plan.flows) != 1:
        raise FlowError(f"{flow_path}: a flow file must create exactly one Dataflow; it created {len(plan.flows)}")

    steps = {src.step_id: src for src in plan.inputs}
    for step, path in inputs.items():
        if step is None:
            if len(steps) != 1:
                raise FlowError(f"--input without STEP= needs a flow with one input step; this one has {sorted(steps)}")
        elif step not in steps:
            raise FlowError(f"no input step {step!r} in {flow_path}; input steps: {sorted(steps)}")
    for src in plan.inputs:
        path = inputs.get(src.step_id, inputs.get(None))
        if path is not None:
            src.path, src.decode = os.path.abspath(path), _decode_for(path)
        else:
            src.path, src.decode = plan.resolve(src.declared.path), src.declared.decode
        src.batch_size = batch_size
    return plan


def load(flow_path, inputs=None, batch_size=1000):
    """Build the Bytewax dataflow of a runnel flow file, with its own sinks.

    `inputs` overrides input steps' files: `{"step_id": "file"}`, or one
    path for a flow with a single input step. Meant for `bytewax.run`::

        python -m bytewax.run "flows/bytewax_adapter:load('flows/my_flow.py')"
    """
    return _build(flow_path, inputs, batch_size=batch_size).flows[0]


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="bytewax_adapter.py",
        description="Run a runnel flow file on Bytewax and print what reaches each output step, "
        'as `runnel replay` does: {"step": ..., "item": ...} per line.',
    )
    ap.add_argument("flow", help="runnel flow file (.py)")
    ap.add_argument("--input", action="append", default=[], metavar="[STEP=]FILE",
                    help="feed input step STEP from FILE (.csv: CSV, else JSON lines)")
    ap.add_argument("--keep-sinks", action="store_true", help="write to the flow's own sinks instead of printing replay lines")
    ap.add_argument("--batch-size", type=int, default=1, help="items per input batch (default 1)")
    ap.add_argument("--freeze-clock", action="store_true",
                    help="EventClock watermarks do not advance with system time (as in runnel replay)")
    args = ap.parse_args(argv)

    inputs = {}
    for spec in args.input:
        step, eq, path = spec.partition("=")
        if not eq:
            step, path = None, spec
        if step in inputs:
            ap.error(f"input step {step!r} given twice")
        inputs[step] = path

    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(encoding="utf-8")
    # The flow's own prints go to stderr; stdout carries only replay lines.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            plan = _build(args.flow, inputs, replay_out=out, keep_sinks=args.keep_sinks,
                          batch_size=args.batch_size, freeze_clock=args.freeze_clock)
        except (FlowError, OSError) as ex:
            print(f"bytewax_adapter: {ex}", file=sys.stderr)
            return 2
        from bytewax.testing import run_main

        run_main(plan.flows[0])
    for reason, n in sorted(SKIPPED.items()):
        _warn(f"skipped {n}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
