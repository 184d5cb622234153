"""Run a runnel flow file on real Bytewax (0.21).

A runnel flow file imports `runnel` (`from runnel import Dataflow, op, win,
sources, sinks`). This adapter installs a stand-in `runnel` package whose
functions have the same names and signatures but build a
`bytewax.dataflow.Dataflow` instead, then executes the flow file. Use it to
check runnel's results against Bytewax, or to move a flow onto a Bytewax
cluster unchanged. It needs only Bytewax 0.21 and this one file, plus
paho-mqtt 2.x for flows that use `sources.mqtt` or `sinks.mqtt`.

Oracle: print what each output step receives
--------------------------------------------
Same contract as `runnel replay`::

    python flows/bytewax_adapter.py FLOW.py [--input [STEP=]FILE ...] [--keep-sinks]
                                    [--freeze-clock] [--batch-size N]
                                    [--config runnel.toml] [--max-seconds N]

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

An input step may be a `sources.mqtt` one like any other: with `--input` it
is fed from the file; without, it subscribes on its broker and runs live.
`--config FILE` names the runnel.toml that brokers (`[brokers.NAME]`) and
`device_id` are read from; a flow whose MQTT steps need a broker fails with
an error naming it when there is none. Without `--keep-sinks`, `sinks.mqtt`
outputs print replay lines like every output; with it they publish. A live
MQTT input never ends by itself: the run lasts until SIGTERM or SIGINT, which
end every input so that the dataflow completes (open windows flush, sinks
finish publishing) and the adapter exits 0 (a second signal aborts), or
until `--max-seconds N` seconds after the inputs started, which does the
same. For example::

    python flows/bytewax_adapter.py flow.py --config runnel.toml --keep-sinks

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

A flow with MQTT sources or sinks needs the config (and `max_seconds=N` ends
its inputs after N seconds, as `--max-seconds` does)::

    python -m bytewax.run -w 1 "flows/bytewax_adapter:load('flow.py', config='runnel.toml')"

Each `sources.mqtt` step is one partition (one subscription in the cluster,
so no message is read twice) and each `sinks.mqtt` step one partition (one
worker publishes all of that step's messages, so `seq` counts them without
gaps; it is the partition's recovery state). Sources and sinks in one
process that name the same broker share one connection; so with `-p 2` or
more, give brokers that are used in several processes no `client_id` (or
they take turns disconnecting each other).

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
- `sources.mqtt(...)`: a paho-mqtt client (TLS, username/password, MQTT
  3.1.1 or 5, persistent sessions from the config); each message is decoded
  (json, cbor, csv, kv, raw) and given its topic fields as runnel does;
  malformed or oversized messages are skipped with a (rate-limited) warning
  on stderr. A QoS 1 message is acknowledged once its items are handed to
  the flow.
- `sinks.mqtt(...)`: each item is published as runnel's envelope
  `{"id", "seq", "device_id", "flow", "step", "key", "window", "value"}`
  (JSON or CBOR), and a batch returns only once the broker has acknowledged
  it (QoS 1) or it is written (QoS 0); after 30 s without a connection or
  acknowledgement the dataflow stops with an error. There is no durable
  outbox: what is unpublished when the process dies is lost.

Differences from runnel that are Bytewax's own: an exception raised by a
flow's function stops the dataflow (runnel skips the item and counts it);
keys returned by a `key_on` function must be `str`; step and flow ids may not
contain `.` (the adapter replaces `.` with `_` in the ids it gives Bytewax,
replay lines keep the original ids); Bytewax's EventClock watermark also
advances with system time while a run lasts.
"""

import argparse
import collections
import contextlib
import csv
import json
import math
import os
import re
import signal
import string
import struct
import sys
import threading
import time
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
from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition, StatelessSinkPartition

__all__ = ["load", "to_json", "read_records", "decode_payload", "cbor_decode", "cbor_encode",
           "mqtt_envelope", "main", "FlowError"]

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
    """A CSV cell as runnel types it: int (within i64), float, None, or str."""
    if s == "":
        return None
    if _INT_RE.match(s):
        n = int(s)
        if -(2**63) <= n < 2**63:
            return n
    if _FLOAT_RE.match(s):  # Rust's f64 syntax, less the digit-free inf/nan
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
    def __init__(self, path, decode, batch_size, resume_at, deadline=None):
        self._it = read_records(path, decode)
        self._batch_size = batch_size
        self._deadline = deadline
        self._pos = 0
        while self._pos < (resume_at or 0):
            next(self._it, None)
            self._pos += 1

    def next_batch(self):
        if _STOP.is_set() or (self._deadline is not None and time.monotonic() >= self._deadline):
            raise StopIteration()
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


class _InputSource(FixedPartitionedSource):
    """An input step: a file (`sources.file`, or any step fed by `--input`)
    or a live MQTT subscription (`sources.mqtt`). One partition either way,
    read by one worker: a file is read once, and an MQTT subscription must
    exist once per cluster or every worker would receive every message
    (Bytewax 0.21's `DynamicSource` runs on all workers)."""

    def __init__(self, step_id, declared):
        self.step_id = step_id
        self.declared = declared  # the runnel sources.file(...) / sources.mqtt(...) object
        self.path = None  # set once the flow file has run: a file to read,
        self.decode = None
        self.broker = None  # or the _BrokerSettings of a live MQTT input
        self.batch_size = 1
        self.max_seconds = None

    def list_parts(self):
        return [self.step_id]

    def build_part(self, step_id, for_part, resume_state):
        deadline = None if self.max_seconds is None else time.monotonic() + self.max_seconds
        if self.broker is not None:
            return _MqttPartition(self, deadline)
        return _FilePartition(self.path, self.decode, self.batch_size, resume_state, deadline)


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
# CBOR (RFC 8949), the subset runnel's MQTT source and sink use
# ---------------------------------------------------------------------------


class _Malformed(ValueError):
    """A payload that does not decode; the message is skipped."""


def cbor_decode(data):
    """Decode one CBOR item that fills `data`, as runnel's MQTT source does.

    Text-keyed maps -> dicts (other keys: malformed); byte strings -> str if
    valid UTF-8, else malformed; tags are ignored (their inner value is used);
    undefined -> None; floats of any width -> float; ints beyond i64 ->
    float. Raises `_Malformed`.
    """
    data = bytes(data)
    value, pos = _cbor_item(data, 0, 0)
    if pos != len(data):
        raise _Malformed(f"{len(data) - pos} bytes after the CBOR item")
    return value


def _cbor_head(data, pos):
    if pos >= len(data):
        raise _Malformed("truncated CBOR")
    ib = data[pos]
    major, ai = ib >> 5, ib & 31
    pos += 1
    if ai < 24:
        return major, ai, ai, pos
    if ai <= 27:
        n = 1 << (ai - 24)
        if pos + n > len(data):
            raise _Malformed("truncated CBOR")
        return major, ai, int.from_bytes(data[pos:pos + n], "big"), pos + n
    if ai == 31 and major in (2, 3, 4, 5, 7):
        return major, ai, None, pos
    raise _Malformed(f"CBOR: reserved or invalid initial byte 0x{ib:02x}")


def _cbor_item(data, pos, depth):
    if depth > 64:
        raise _Malformed("CBOR nested deeper than 64 levels")
    major, ai, arg, pos = _cbor_head(data, pos)
    if major in (0, 1):
        n = arg if major == 0 else -1 - arg
        return (n if -(2**63) <= n < 2**63 else float(n)), pos  # runnel's ints are i64
    if major in (2, 3):
        if arg is None:  # indefinite length: definite chunks of the same type
            raw = bytearray()
            while True:
                if pos < len(data) and data[pos] == 0xFF:
                    pos += 1
                    break
                m, _, n, pos = _cbor_head(data, pos)
                if m != major or n is None or pos + n > len(data):
                    raise _Malformed("CBOR: bad chunk in an indefinite-length string")
                raw += data[pos:pos + n]
                pos += n
        else:
            if pos + arg > len(data):
                raise _Malformed("truncated CBOR")
            raw = data[pos:pos + arg]
            pos += arg
        try:
            return bytes(raw).decode("utf-8"), pos
        except UnicodeDecodeError:
            what = "byte string" if major == 2 else "text string"
            raise _Malformed(f"CBOR {what} is not valid UTF-8") from None
    if major == 4:
        out = []
        if arg is None:
            while not (pos < len(data) and data[pos] == 0xFF):
                v, pos = _cbor_item(data, pos, depth + 1)
                out.append(v)
            return out, pos + 1
        if arg > len(data) - pos:
            raise _Malformed("truncated CBOR")
        for _ in range(arg):
            v, pos = _cbor_item(data, pos, depth + 1)
            out.append(v)
        return out, pos
    if major == 5:
        out = {}
        n = 0
        while (n < arg) if arg is not None else not (pos < len(data) and data[pos] == 0xFF):
            if arg is not None and arg > len(data) - pos:
                raise _Malformed("truncated CBOR")
            kpos = pos
            while kpos < len(data) and data[kpos] >> 5 == 6:  # tags on the key
                _, _, _, kpos = _cbor_head(data, kpos)
            if kpos >= len(data) or data[kpos] >> 5 != 3:
                raise _Malformed("CBOR map key is not a text string")
            k, pos = _cbor_item(data, pos, depth + 1)
            out[k], pos = _cbor_item(data, pos, depth + 1)
            n += 1
        return out, (pos if arg is not None else pos + 1)
    if major == 6:
        return _cbor_item(data, pos, depth + 1)
    # major 7
    if ai == 20:
        return False, pos
    if ai == 21:
        return True, pos
    if ai in (22, 23):
        return None, pos
    if ai == 25:
        return struct.unpack(">e", arg.to_bytes(2, "big"))[0], pos
    if ai == 26:
        return struct.unpack(">f", arg.to_bytes(4, "big"))[0], pos
    if ai == 27:
        return struct.unpack(">d", arg.to_bytes(8, "big"))[0], pos
    if ai == 31:
        raise _Malformed("CBOR: unexpected break")
    raise _Malformed(f"CBOR: unsupported simple value {arg}")


def cbor_encode(obj):
    """CBOR of JSON-ready data (see `to_json`): shortest-form ints and
    lengths, floats as 64-bit; ints beyond 64 bits as bignum tags."""
    out = bytearray()
    _cbor_enc(obj, out)
    return bytes(out)


def _cbor_head_enc(major, n, out):
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out += bytes((mt | 24, n))
    elif n < 0x10000:
        out.append(mt | 25)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(mt | 26)
        out += n.to_bytes(4, "big")
    else:
        out.append(mt | 27)
        out += n.to_bytes(8, "big")


def _cbor_enc(obj, out):
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        if 0 <= obj < 2**64:
            _cbor_head_enc(0, obj, out)
        elif -(2**64) <= obj < 0:
            _cbor_head_enc(1, -1 - obj, out)
        else:  # bignum: tag 2 (positive) or 3 (negative), big-endian bytes
            n = obj if obj >= 0 else -1 - obj
            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            _cbor_head_enc(6, 2 if obj >= 0 else 3, out)
            _cbor_head_enc(2, len(raw), out)
            out += raw
    elif isinstance(obj, float):
        out.append(0xFB)
        out += struct.pack(">d", obj)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8", "replace")
        _cbor_head_enc(3, len(raw), out)
        out += raw
    elif isinstance(obj, (bytes, bytearray)):
        _cbor_head_enc(2, len(obj), out)
        out += obj
    elif isinstance(obj, (list, tuple)):
        _cbor_head_enc(4, len(obj), out)
        for v in obj:
            _cbor_enc(v, out)
    elif isinstance(obj, dict):
        _cbor_head_enc(5, len(obj), out)
        for k, v in obj.items():
            _cbor_enc(k if isinstance(k, str) else str(k), out)
            _cbor_enc(v, out)
    else:
        _cbor_enc(repr(obj), out)


# ---------------------------------------------------------------------------
# MQTT: topic filters, payload decoding, envelopes (as runnel's MQTT source
# and sink do)
# ---------------------------------------------------------------------------


def _topic_fields(topic, where):
    """The `{name}` levels of a topic filter, validated (runnel's rules)."""
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


_MQTT_DECODES = ("json", "cbor", "csv", "kv", "raw")
_TOPIC_VARS = ("key", "flow", "step", "device_id")


class _TopicFilter:
    """One `sources.mqtt` topic filter: what to subscribe to (`{name}`
    levels as `+`) and which topic levels go into which item fields."""

    def __init__(self, text):
        self.text = text
        self.levels = text.split("/")
        self.names = {}  # level index -> field name
        for i, level in enumerate(self.levels):
            if level.startswith("{") and level.endswith("}") and len(level) > 2:
                self.names[i] = level[1:-1]
                self.levels[i] = "+"
        self.subscription = "/".join(self.levels)

    def match(self, topic):
        """The fields this filter takes from `topic`, or None if it does not match."""
        parts = topic.split("/")
        if parts[0].startswith("$") and self.levels[0] in ("+", "#"):
            return None  # wildcards do not match $SYS-style topics
        fields = {}
        for i, level in enumerate(self.levels):
            if level == "#":
                return fields
            if i >= len(parts):
                return None
            if level == "+":
                if i in self.names:
                    fields[self.names[i]] = parts[i]
            elif level != parts[i]:
                return None
        return fields if len(parts) == len(self.levels) else None


_KV_SPLIT = re.compile(r"[\s,]+")


def decode_payload(payload, decode, columns=None):
    """The items of one MQTT message's payload, and the problems with rows or
    lines that were skipped. Raises `_Malformed` if the whole message is.

    json: one JSON value; cbor: one CBOR item (see `cbor_decode`); csv: each
    non-empty line a row, the first line the header unless `columns`; kv:
    each non-empty line `k=v` tokens separated by whitespace and/or commas;
    raw: the payload as str. Cells and kv values are typed as CSV cells.
    """
    if decode == "cbor":
        return [cbor_decode(payload)], []
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("payload is not valid UTF-8") from None
    if decode == "raw":
        return [text], []
    if decode == "json":
        try:
            return [json.loads(text, parse_constant=_reject_constant)], []
        except ValueError as ex:
            raise _Malformed(f"payload is not JSON: {ex}") from None
    items, problems = [], []
    # Lines as Rust's str::lines() gives them; blank ones are skipped.
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise _Malformed("empty payload")
    if decode == "csv":
        header = list(columns) if columns else None
        for line in lines:
            try:
                cells = next(csv.reader([line]), [])
            except csv.Error as ex:
                problems.append(f"not CSV ({ex})")
                continue
            if header is None:
                header = [c.strip() for c in cells]
            elif len(cells) != len(header):
                problems.append(f"{len(cells)} cells, but the header has {len(header)}")
            else:
                items.append({h: _csv_cell(c) for h, c in zip(header, cells)})
        if not items and not problems:
            problems.append("no rows")
        return items, problems
    if decode == "kv":
        for line in lines:
            tokens = [t for t in _KV_SPLIT.split(line) if t]
            item = {}
            for tok in tokens:
                k, eq, v = tok.partition("=")
                if not eq or not k:
                    problems.append(f"kv line has a token without key=value: {tok[:40]!r}")
                    item = None
                    break
                item[k] = _csv_cell(v)
            if item is not None:
                items.append(item)
        return items, problems
    raise ValueError(f"unknown decode {decode!r}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def mqtt_envelope(item, seq, device_id, flow, step):
    """The object runnel's MQTT sink publishes for `item`, and the item's key
    (None if it has none). Keys in runnel's order: id, seq, device_id, flow,
    step, key, window, value."""
    env = {"id": None, "seq": seq, "device_id": device_id, "flow": flow, "step": step}
    prefix = f"{device_id}/{flow}/{step}"
    if type(item) is tuple and len(item) == 2 and isinstance(item[0], str):
        key, rest = item
        env["key"] = key
        if type(rest) is tuple and len(rest) == 2 and _is_int(rest[0]):
            env["window"] = rest[0]
            env["value"] = to_json(rest[1])
            env["id"] = f"{prefix}/{key}/{rest[0]}"
        else:
            env["value"] = to_json(rest)
            env["id"] = f"{prefix}/{key}/#{seq}"
        return env, key
    env["value"] = to_json(item)
    env["id"] = f"{prefix}/#{seq}"
    return env, None


def _topic_key(key):
    key = key.replace("/", "_").replace("+", "_").replace("#", "_")
    return key or "_"


class _RateLimited:
    """Warnings that may repeat per message: the first of each kind at once,
    then at most one line per kind every 10 s with a count of the rest."""

    INTERVAL = 10.0

    def __init__(self):
        self._last = {}  # kind -> (time printed, suppressed since)

    def warn(self, kind, msg):
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self.INTERVAL:
            self._last[kind] = (last[0], last[1] + 1)
            return
        more = f" (and {last[1]} more like it)" if last and last[1] else ""
        self._last[kind] = (now, 0)
        _warn(msg + more)


_RATE = _RateLimited()

# Set by SIGTERM/SIGINT under main(): every source of the adapter ends its
# partition, so the dataflow completes (windows flush, sinks finish).
_STOP = threading.Event()

_POLL = timedelta(milliseconds=20)  # how often an idle MQTT source looks again
_PUBLISH_TIMEOUT = 30.0  # s a sink waits for the broker (connection, acks) per batch


# ---------------------------------------------------------------------------
# The agent's config file (runnel.toml): brokers and device_id
# ---------------------------------------------------------------------------


class _BrokerSettings:
    """`[brokers.NAME]`, checked as runnel checks it (keys the adapter has
    no use for, such as `max_outbox_bytes` or `outbox_full`, are ignored)."""

    def __init__(self, name, table, base, where, device_id):
        def get(key, types, default=None):
            v = table.get(key, default)
            if v is not default and (isinstance(v, bool) and bool not in types or not isinstance(v, types)):
                raise FlowError(f"{where}: [brokers.{name}] `{key}` must be {' or '.join(t.__name__ for t in types)}; got {v!r}")
            return v

        def path(v):
            return v if os.path.isabs(v) else os.path.join(base, v)

        self.name = name
        tls = get("tls", (dict,))
        self.tls = None
        if tls is not None:
            self.tls = {}
            for k in ("ca", "cert", "key"):
                v = tls.get(k)
                if v is not None and (not isinstance(v, str) or not v):
                    raise FlowError(f"{where}: [brokers.{name}.tls] `{k}` must be a path; got {v!r}")
                self.tls[k] = path(v) if v else None
            if bool(self.tls["cert"]) != bool(self.tls["key"]):
                raise FlowError(f"{where}: [brokers.{name}]: tls: give both cert and key (mutual TLS) or neither")
        self.host = get("host", (str,), "localhost")
        if not self.host.strip():
            raise FlowError(f"{where}: [brokers.{name}]: host is empty")
        self.port = get("port", (int,), 8883 if tls is not None else 1883)
        if not 1 <= self.port <= 65535:
            raise FlowError(f"{where}: [brokers.{name}] `port` must be 1..65535; got {self.port}")
        self.client_id = get("client_id", (str,))
        self.username = get("username", (str,))
        pw = get("password_file", (str,))
        self.password_file = path(pw) if pw else None
        self.keepalive = get("keepalive", (int,), 30)
        if not (self.keepalive == 0 or 5 <= self.keepalive <= 65535):
            raise FlowError(f"{where}: [brokers.{name}]: keepalive must be 0 (off) or at least 5 seconds; got {self.keepalive}")
        self.persistent_session = get("persistent_session", (bool,), False)
        self.protocol = get("protocol", (str,), "3.1.1")
        if self.protocol not in ("3.1.1", "5"):
            raise FlowError(f"{where}: [brokers.{name}] `protocol` must be \"3.1.1\" or \"5\"; got {self.protocol!r}")
        if self.persistent_session and not self.client_id:
            self.client_id = f"runnel-{device_id}-{name}"  # runnel's default; a session needs a name
        if self.password_file and self.username is None:
            raise FlowError(f"{where}: [brokers.{name}] `password_file` needs a `username`")
        self.where = where

    def password(self):
        if not self.password_file:
            return None
        try:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as ex:
            raise FlowError(f"{self.where}: [brokers.{self.name}] cannot read `password_file`: {ex}") from None

    def describe(self):
        return f"broker {self.name!r} ({self.host}:{self.port}{', TLS' if self.tls is not None else ''})"


class _Config:
    """The parts of runnel.toml the adapter uses: `device_id`, `[brokers.*]`."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            try:
                import tomli as tomllib
            except ImportError:
                raise FlowError("reading a runnel.toml needs Python 3.11+ (tomllib) or `pip install tomli`") from None
        try:
            with open(self.path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as ex:
            raise FlowError(f"cannot read config file {path}: {ex}") from None
        except tomllib.TOMLDecodeError as ex:
            raise FlowError(f"config file {path}: {ex}") from None
        device_id = doc.get("device_id")
        if device_id is not None and not isinstance(device_id, str):
            raise FlowError(f"config file {path}: `device_id` must be a str; got {device_id!r}")
        if not device_id or not device_id.strip():
            try:
                with open("/etc/hostname", encoding="utf-8") as f:
                    device_id = f.read().strip()
            except OSError:
                device_id = ""
        self.device_id = device_id or "unnamed-device"
        brokers = doc.get("brokers", {})
        if not isinstance(brokers, dict):
            raise FlowError(f"config file {path}: `brokers` must be tables [brokers.NAME]")
        base = os.path.dirname(self.path)
        self.brokers = {}
        for name, table in brokers.items():
            if not isinstance(table, dict):
                raise FlowError(f"config file {path}: `brokers.{name}` must be a table [brokers.{name}]")
            self.brokers[name] = _BrokerSettings(name, table, base, f"config file {path}", self.device_id)


# ---------------------------------------------------------------------------
# MQTT connections (paho-mqtt 2.x), one per broker per process
# ---------------------------------------------------------------------------


def _paho():
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
    except ImportError:
        raise RuntimeError("MQTT sources and sinks need paho-mqtt 2.x: pip install 'paho-mqtt>=2,<3'") from None
    return mqtt, CallbackAPIVersion


class _Delivery:
    """One received message; acknowledged (QoS 1) to the broker once every
    source it was routed to has handed its items to the flow."""

    __slots__ = ("topic", "payload", "_broker", "_mid", "_qos", "_left")

    def __init__(self, broker, msg, consumers):
        self.topic, self.payload = msg.topic, msg.payload
        self._broker, self._mid, self._qos, self._left = broker, msg.mid, msg.qos, consumers

    def done(self):
        with self._broker.lock:
            self._left -= 1
            last = self._left == 0
        if last and self._qos > 0:
            self._broker.client.ack(self._mid, self._qos)


class _Broker:
    """A paho client shared by every MQTT source and sink of this process
    that names the same broker (one connection, as runnel has, so a
    configured `client_id` is used once). It connects in the background and
    reconnects by itself; sources' subscriptions are renewed on connect."""

    _open = {}
    _open_lock = threading.Lock()

    @classmethod
    def acquire(cls, settings):
        with cls._open_lock:
            b = cls._open.get(settings.name)
            if b is None:
                b = cls._open[settings.name] = _Broker(settings)
            b.users += 1
            return b

    @classmethod
    def close_all(cls):
        with cls._open_lock:
            brokers, cls._open = list(cls._open.values()), {}
        for b in brokers:
            b._shutdown()

    def release(self):
        with _Broker._open_lock:
            self.users -= 1
            if self.users > 0:
                return
            if _Broker._open.get(self.settings.name) is self:
                del _Broker._open[self.settings.name]
        self._shutdown()

    def __init__(self, s):
        mqtt, api = _paho()
        self.settings = s
        self.users = 0
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribers = []  # _MqttPartition
        self._sub_mids = {}  # SUBSCRIBE mid -> (partition, filters)
        self._closing = False
        v5 = s.protocol == "5"
        kw = {"client_id": s.client_id or "", "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311, "manual_ack": True}
        if not v5:
            kw["clean_session"] = not s.persistent_session
        c = self.client = mqtt.Client(api.VERSION2, **kw)
        if s.username is not None:
            c.username_pw_set(s.username, s.password())
        if s.tls is not None:
            try:
                c.tls_set(ca_certs=s.tls["ca"], certfile=s.tls["cert"], keyfile=s.tls["key"])
            except (OSError, ValueError) as ex:  # ssl.SSLError is an OSError
                raise RuntimeError(f"{s.describe()}: TLS setup failed: {ex}") from None
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.reconnect_delay_set(1, 30)
        conn_kw = {}
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            conn_kw["clean_start"] = not s.persistent_session
            if s.persistent_session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0xFFFFFFFF
                conn_kw["properties"] = props
        c.connect_async(s.host, s.port, s.keepalive, **conn_kw)
        c.loop_start()

    def _shutdown(self):
        self._closing = True
        try:
            self.client.disconnect()
            self.client.loop_stop()
        except Exception as ex:  # noqa: BLE001 - closing must not fail the run
            _warn(f"{self.settings.describe()}: closing: {ex}")

    # -- sources -------------------------------------------------------------
    def subscribe(self, part):
        with self.lock:
            self.subscribers.append(part)
            connected = self.connected.is_set()
        if connected:
            self._subscribe(part)

    def unsubscribe(self, part):
        with self.lock:
            if part in self.subscribers:
                self.subscribers.remove(part)

    def _subscribe(self, part):
        filters = sorted({f.subscription for f in part.filters})
        rc, mid = self.client.subscribe([(f, part.qos) for f in filters])
        if rc == 0:
            with self.lock:
                self._sub_mids[mid] = (part, filters)

    # -- paho callbacks (network thread): never raise --------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        try:
            if reason_code.is_failure:
                _RATE.warn(("connect", self.settings.name), f"{self.settings.describe()} refused the connection: {reason_code}")
                return
            _warn(f"connected to {self.settings.describe()}")
            self.connected.set()
            with self.lock:
                parts = list(self.subscribers)
            for part in parts:
                self._subscribe(part)
        except Exception as ex:  # noqa: BLE001
            _warn(f"{self.settings.describe()}: on connect: {ex!r}")

    def _on_connect_fail(self, client, userdata):
        _RATE.warn(("connect", self.settings.name), f"cannot connect to {self.settings.describe()}; retrying")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self._closing:
            _RATE.warn(("disconnect", self.settings.name),
                       f"disconnected from {self.settings.describe()}: {reason_code}; reconnecting")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.lock:
            part, filters = self._sub_mids.pop(mid, (None, []))
        if part is None:
            return
        for f, rc in zip(filters, reason_codes):
            if rc.is_failure:
                _warn(f"mqtt source {part.step_id!r}: {self.settings.describe()} refused the subscription to {f!r}: {rc}")
            else:
                _warn(f"mqtt source {part.step_id!r}: subscribed to {f!r} on {self.settings.describe()}")

    def _on_message(self, client, userdata, msg):
        try:
            with self.lock:
                targets = [p for p in self.subscribers if p.wants(msg.topic)]
            delivery = _Delivery(self, msg, len(targets))
            if not targets:
                delivery._left = 1
                delivery.done()
            for p in targets:
                p.inbox.append(delivery)
        except Exception as ex:  # noqa: BLE001
            _warn(f"{self.settings.describe()}: on message: {ex!r}")

    # -- sinks ---------------------------------------------------------------
    def publish_all(self, messages, qos, retain):
        """Publish `[(topic, payload)]` and wait until the broker has them
        (QoS 1: PUBACK; QoS 0: written to the socket)."""
        mqtt, _ = _paho()
        deadline = time.monotonic() + _PUBLISH_TIMEOUT
        if not self.connected.wait(_PUBLISH_TIMEOUT):
            raise RuntimeError(f"not connected to {self.settings.describe()} after {_PUBLISH_TIMEOUT:.0f} s; cannot publish")
        infos = []
        for topic, payload in messages:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
                info.rc = mqtt.MQTT_ERR_SUCCESS  # queued by paho; sent on reconnect
            infos.append(info)
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise RuntimeError(f"{self.settings.describe()} did not acknowledge a publish within {_PUBLISH_TIMEOUT:.0f} s")


class _MqttPartition(StatefulSourcePartition):
    """The live side of a `sources.mqtt` input step: messages the broker
    delivers, decoded into items in arrival order."""

    def __init__(self, src, deadline):
        decl = src.declared
        self.step_id = src.step_id
        self.decl = decl
        self.qos = decl.qos
        self.filters = [_TopicFilter(t) for t in decl.topics]
        self.inbox = collections.deque()  # _Delivery, appended by paho's thread
        self._pending = collections.deque()  # (item, delivery to finish or None)
        self._batch_size = src.batch_size
        self._deadline = deadline
        self._awake = None
        self._broker = _Broker.acquire(src.broker)
        self._broker.subscribe(self)

    def wants(self, topic):
        return any(f.match(topic) is not None for f in self.filters)

    def _decode(self, d):
        where = f"mqtt source {self.step_id!r}: message on {d.topic!r}"
        if len(d.payload) > self.decl.max_payload:
            _skip("mqtt: payload longer than max_payload")
            _RATE.warn((self.step_id, "size"), f"{where}: skipped, {len(d.payload)} bytes > max_payload {self.decl.max_payload}")
            return []
        try:
            items, problems = decode_payload(d.payload, self.decl.decode, self.decl.columns)
        except _Malformed as ex:
            _skip(f"mqtt: malformed {self.decl.decode} payload")
            _RATE.warn((self.step_id, "malformed"), f"{where}: skipped malformed {self.decl.decode} payload: {ex}")
            return []
        for p in problems:
            _skip(f"mqtt: malformed {self.decl.decode} row")
            _RATE.warn((self.step_id, "row"), f"{where}: skipped a row: {p}")
        fields = None
        for f in self.filters:
            fields = f.match(d.topic)
            if fields is not None:
                break
        fields = dict(fields or {})
        if self.decl.topic_field:
            fields[self.decl.topic_field] = d.topic
        if fields:
            items = [dict(it, **fields) if isinstance(it, dict) else {"value": it, **fields} for it in items]
        return items

    def next_batch(self):
        if _STOP.is_set() or (self._deadline is not None and time.monotonic() >= self._deadline):
            raise StopIteration()
        while len(self._pending) < self._batch_size and self.inbox:
            d = self.inbox.popleft()
            items = self._decode(d)
            if not items:
                d.done()
            for i, item in enumerate(items):
                self._pending.append((item, d if i == len(items) - 1 else None))
        batch = []
        while self._pending and len(batch) < self._batch_size:
            item, d = self._pending.popleft()
            batch.append(item)
            if d is not None:
                d.done()
        if self._pending or self.inbox:
            self._awake = None
        else:
            self._awake = datetime.now(timezone.utc) + _POLL
        return batch

    def next_awake(self):
        return self._awake

    def snapshot(self):
        return None  # a broker cannot be rewound; a persistent session redelivers

    def close(self):
        self._broker.unsubscribe(self)
        self._broker.release()


class _MqttSinkPartition(StatefulSinkPartition):
    def __init__(self, sink, seq):
        self._sink = sink
        self._seq = seq or 0
        self._broker = _Broker.acquire(sink.broker)

    def write_batch(self, values):
        s = self._sink
        messages = []
        for item in values:
            env, key = mqtt_envelope(item, self._seq + 1, s.device_id, s.flow, s.step)
            if key is None and s.uses_key:
                _skip("mqtt sink: item without a key for a {key} topic")
                _RATE.warn((s.step, "nokey"), f"mqtt sink {s.step!r}: skipped an item without a key; the topic {s.declared.topic!r} needs {{key}}")
                continue
            topic = s.declared.topic.format(key=_topic_key(key) if key is not None else "",
                                            flow=s.flow, step=s.step, device_id=s.device_id)
            payload = cbor_encode(env) if s.declared.encode == "cbor" else _json_text(env).encode("utf-8", "replace")
            self._seq += 1
            messages.append((topic, payload))
        if messages:
            self._broker.publish_all(messages, s.declared.qos, s.declared.retain)

    def snapshot(self):
        return self._seq

    def close(self):
        self._broker.release()


class _MqttSink(FixedPartitionedSink):
    """runnel's `sinks.mqtt(...)`. One partition, so one worker publishes all
    of a step's messages in order and `seq` counts them without gaps or
    duplicates across workers; the partition's state is `seq`."""

    def __init__(self, step_id, declared):
        self.step = step_id  # the runnel output step id (not Bytewax's)
        self.declared = declared
        self.uses_key = any(f == "key" for _, f, _, _ in string.Formatter().parse(declared.topic))
        self.broker = None  # _BrokerSettings, set once the flow file has run
        self.device_id = None
        self.flow = None

    def list_parts(self):
        return ["mqtt"]

    def build_part(self, step_id, for_part, resume_state):
        return _MqttSinkPartition(self, resume_state)


def _route_to_single_part(item):
    return ("mqtt", item)


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
        self.config = None  # _Config of --config / load(config=...), or None
        self.flows = []
        self.flow_ids = []  # the runnel ids of self.flows (Bytewax's have no `.`)
        self.inputs = []  # _InputSource, in creation order
        self.outputs = []  # runnel output step ids
        self.mqtt_sinks = []  # _MqttSink that publish (need a broker)

    def resolve(self, path):
        return path if os.path.isabs(path) else os.path.join(self.flow_dir, path)

    def broker(self, name, who):
        """The settings of `[brokers.NAME]`, or a FlowError saying what is missing."""
        if self.config is None:
            raise FlowError(f"{who} uses broker {name!r}, but no config file names it: pass --config runnel.toml "
                            f"(or load(..., config='runnel.toml')) with a [brokers.{name}] table")
        settings = self.config.brokers.get(name)
        if settings is None:
            have = ", ".join(sorted(self.config.brokers)) or "none"
            raise FlowError(f"{who} uses broker {name!r}, but {self.config.path} has no [brokers.{name}] table "
                            f"(brokers: {have})")
        settings.password()  # a missing password file is an error now, not at connect time
        return settings


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
                _PLAN.flow_ids.append(flow_id)
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

    class _SourceMqtt(Source):
        kind = "mqtt"

        def __init__(self, topics, broker, qos, decode, columns, topic_field, max_payload):
            self.topics = topics
            self.broker = broker
            self.qos = qos
            self.decode = decode
            self.columns = columns
            self.topic_field = topic_field
            self.max_payload = max_payload

        def __repr__(self):
            return f"sources.mqtt({self.topics!r}, broker={self.broker!r}, qos={self.qos}, decode={self.decode!r})"

    def source_mqtt(topics, *, broker: str = "default", qos: int = 1, decode: str = "json", columns=None,
                    topic_field=None, max_payload: int = 262144) -> Source:
        # Same checks and messages as runnel's sources.mqtt.
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
        if columns is not None:
            if decode != "csv":
                raise ValueError(f"{where}: `columns` is only for decode=\"csv\"")
            if not isinstance(columns, (list, tuple)) or not columns or not all(isinstance(c, str) and c for c in columns):
                raise TypeError(f"{where}: `columns` must be a non-empty list of str; got {columns!r}")
            columns = list(columns)
        if topic_field is not None and (not isinstance(topic_field, str) or not topic_field):
            raise TypeError(f"{where}: `topic_field` must be a non-empty str or None; got {topic_field!r}")
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or max_payload < 1:
            raise ValueError(f"{where}: `max_payload` must be a positive int (bytes); got {max_payload!r}")
        return _SourceMqtt(list(topics), broker, qos, decode, columns, topic_field, max_payload)

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

    class _SinkMqtt(Sink):
        kind = "mqtt"

        def __init__(self, topic, broker, qos, encode, retain):
            self.topic = topic
            self.broker = broker
            self.qos = qos
            self.encode = encode
            self.retain = retain

        def __repr__(self):
            return f"sinks.mqtt({self.topic!r}, broker={self.broker!r}, qos={self.qos}, encode={self.encode!r})"

    def sink_mqtt(topic: str, *, broker: str = "upstream", qos: int = 1, encode: str = "json",
                  retain: bool = False) -> Sink:
        # Same checks and messages as runnel's sinks.mqtt.
        where = f"sinks.mqtt({topic!r})"
        if not isinstance(topic, str) or not topic:
            raise TypeError(f"sinks.mqtt: `topic` must be a non-empty str; got {topic!r}")
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(topic) if f is not None]
        except ValueError as e:
            raise ValueError(f"{where}: {e}; write a literal brace as {{{{ or }}}}") from None
        for n in names:
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
        return _SinkMqtt(topic, broker, qos, encode, retain)

    # -- runnel.op -----------------------------------------------------------
    class BranchOut(NamedTuple):
        trues: Any
        falses: Any

    def op_input(step_id: str, flow, source):
        if not isinstance(flow, _BwDataflow):
            raise TypeError(f"op.input {step_id!r}: `flow` must be a Dataflow; got {type(flow).__name__}")
        if not isinstance(source, Source):
            raise TypeError(f"op.input {step_id!r}: `source` must come from runnel.sources; got {type(source).__name__}")
        src = _InputSource(step_id, source)
        _PLAN.inputs.append(src)
        return bop.input(_bw_id(step_id), flow, src)

    def op_output(step_id: str, up, sink) -> None:
        if not isinstance(sink, Sink):
            raise TypeError(f"op.output {step_id!r}: `sink` must come from runnel.sinks; got {type(sink).__name__}")
        _PLAN.outputs.append(step_id)
        if _PLAN.replay_out is not None and not _PLAN.keep_sinks:
            bop.output(_bw_id(step_id), up, _ReplaySink(step_id, _PLAN.replay_out))
        elif isinstance(sink, _SinkMqtt):
            real = _MqttSink(step_id, sink)
            _PLAN.mqtt_sinks.append(real)
            _single_part_output(_bw_id(step_id), up, real)
        elif isinstance(sink, _SinkFile):
            bop.output(_bw_id(step_id), up, _FileJsonSink(_PLAN.resolve(sink.path)))
        else:
            bop.output(_bw_id(step_id), up, _StdoutJsonSink(_PLAN.stdout))

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
                     {"Source": Source, "file": source_file, "mqtt": source_mqtt})
    sinks = module("runnel.sinks", "runnel sinks (Bytewax adapter)",
                   {"Sink": Sink, "stdout": sink_stdout, "file": sink_file, "mqtt": sink_mqtt})
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
def _single_part_output(step_id: str, up: _BwStream, sink: Any) -> None:
    # A FixedPartitionedSink takes (key, value) pairs and routes them by key;
    # every item goes to the sink's one partition.
    bop.output("publish", bop.map("route", up, _route_to_single_part), sink)


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


def _build(flow_path, inputs, replay_out=None, keep_sinks=False, batch_size=1000, freeze_clock=False,
           config=None, max_seconds=None):
    global _PLAN
    inputs = _normalize_inputs(inputs)
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0):
        raise FlowError(f"max_seconds must be a positive number; got {max_seconds!r}")
    plan = _Plan(flow_path, replay_out, keep_sinks, batch_size)
    if config is not None:
        plan.config = _Config(os.fspath(config))
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
        elif src.declared.kind == "mqtt":  # live: subscribe on the broker
            src.broker = plan.broker(src.declared.broker, f"input step {src.step_id!r} (sources.mqtt)")
        else:
            src.path, src.decode = plan.resolve(src.declared.path), src.declared.decode
        src.batch_size = batch_size
        src.max_seconds = max_seconds
    for sink in plan.mqtt_sinks:
        sink.broker = plan.broker(sink.declared.broker, f"output step {sink.step!r} (sinks.mqtt)")
        sink.device_id = plan.config.device_id
        sink.flow = plan.flow_ids[0]
    return plan


def load(flow_path, inputs=None, batch_size=1000, *, config=None, max_seconds=None):
    """Build the Bytewax dataflow of a runnel flow file, with its own sinks.

    `inputs` overrides input steps' files: `{"step_id": "file"}`, or one
    path for a flow with a single input step. `config` is the runnel.toml
    that `sources.mqtt`/`sinks.mqtt` take brokers and `device_id` from.
    `max_seconds` ends every input after that many seconds. Meant for
    `bytewax.run`::

        python -m bytewax.run "flows/bytewax_adapter:load('flows/my_flow.py')"
        python -m bytewax.run "flows/bytewax_adapter:load('flow.py', config='runnel.toml')"
    """
    return _build(flow_path, inputs, batch_size=batch_size, config=config, max_seconds=max_seconds).flows[0]


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
    ap.add_argument("--config", metavar="FILE",
                    help="runnel.toml with the [brokers.NAME] and device_id of the flow's MQTT sources and sinks")
    ap.add_argument("--max-seconds", type=float, metavar="N",
                    help="end every input after N seconds of wall time (the dataflow then completes)")
    args = ap.parse_args(argv)
    if args.max_seconds is not None and not args.max_seconds > 0:
        ap.error("--max-seconds must be positive")

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
                          batch_size=args.batch_size, freeze_clock=args.freeze_clock,
                          config=args.config, max_seconds=args.max_seconds)
        except (FlowError, OSError) as ex:
            print(f"bytewax_adapter: {ex}", file=sys.stderr)
            return 2
        from bytewax.testing import run_main

        # SIGTERM/SIGINT: the inputs end, so the dataflow completes (windows
        # flush, sinks publish) and we exit 0; a second signal aborts.
        def on_signal(signum, frame):
            if _STOP.is_set():
                raise KeyboardInterrupt()
            _STOP.set()
            _warn(f"{signal.Signals(signum).name}: stopping the inputs (again to abort)")

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            run_main(plan.flows[0])
        except KeyboardInterrupt:
            _warn("aborted")
            return 130
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            _Broker.close_all()
    for reason, n in sorted(SKIPPED.items()):
        _warn(f"skipped {n}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
