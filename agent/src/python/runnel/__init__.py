"""runnel: Python flows in Bytewax's vocabulary, run by the runnel edge agent.

A flow file builds a :class:`Dataflow` with the operators in
:mod:`runnel.op` and :mod:`runnel.win`. runnel turns the recorded steps into
a Rust execution plan; Python code runs only inside the functions you pass
to operators, and is called with batches of items.

```python
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("temps")
readings = op.input("in", flow, sources.file("readings.jsonl"))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=5), unit="s")
stats = win.aggregate("stats", keyed, clock,
                      win.TumblingWindower(timedelta(seconds=10),
                                            datetime(2024, 1, 1, tzinfo=timezone.utc)),
                      {"temp": ["mean", "max"]})
op.output("out", stats.down, sinks.stdout())
```
"""

import sys as _sys

__all__ = ["Dataflow", "Stream", "op", "win", "sources", "sinks"]

# Every Dataflow created while a flow file executes, in creation order.
# The agent reads and clears this after running a flow file.
_created = []


def _caller_location():
    """Return "file:line" of the first frame outside the runnel package."""
    frame = _sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("runnel"):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _Step:
    """One recorded operator call: what the Rust planner reads."""

    __slots__ = ("kind", "step_id", "ups", "downs", "params", "where")

    def __init__(self, kind, step_id, ups, downs, params, where):
        self.kind = kind
        self.step_id = step_id
        self.ups = ups
        self.downs = downs
        self.params = params
        self.where = where

    def __repr__(self):
        return f"_Step({self.kind!r}, {self.step_id!r}, ups={self.ups}, downs={self.downs})"


class Dataflow:
    """A dataflow: the graph of steps that one flow file builds.

    `flow_id` names the flow in logs, counters and summary ids; it must be
    unique among the flows an agent runs.

    ```python
    from runnel import Dataflow
    flow = Dataflow("greenhouse")
    ```
    """

    def __init__(self, flow_id: str):
        if not isinstance(flow_id, str) or not flow_id:
            raise TypeError(f"Dataflow id must be a non-empty str; got {flow_id!r}")
        self.flow_id = flow_id
        self._steps = []
        self._step_where = {}
        self._stream_count = 0
        self._where = _caller_location()
        _created.append(self)

    def __repr__(self):
        return f"Dataflow({self.flow_id!r})"

    def _new_stream(self, step_id):
        n = self._stream_count
        self._stream_count += 1
        return Stream(self, n, step_id)

    def _add_step(self, kind, step_id, ups, n_downs, params):
        where = _caller_location()
        if not isinstance(step_id, str) or not step_id:
            raise TypeError(f"step id must be a non-empty str; got {step_id!r} at {where}")
        if step_id in self._step_where:
            raise ValueError(
                f"duplicate step id {step_id!r} in flow {self.flow_id!r}: "
                f"first used at {self._step_where[step_id]}, again at {where}; "
                "every step in a flow needs its own id"
            )
        for up in ups:
            if not isinstance(up, Stream):
                raise TypeError(
                    f"step {step_id!r} at {where}: expected a Stream as upstream; "
                    f"got {type(up).__name__}"
                )
            if up.flow is not self:
                raise ValueError(
                    f"step {step_id!r} at {where}: upstream stream belongs to flow "
                    f"{up.flow.flow_id!r}, not {self.flow_id!r}"
                )
        self._step_where[step_id] = where
        downs = [self._new_stream(step_id) for _ in range(n_downs)]
        self._steps.append(
            _Step(kind, step_id, [u._n for u in ups], [d._n for d in downs], params, where)
        )
        return downs


class Stream:
    """A stream of items flowing out of a step.

    You never build a Stream yourself; operators return them. A stream of
    `(key, value)` 2-tuples with `str` keys is a *keyed* stream, which the
    `*_value`, stateful and windowing operators require (see `op.key_on`).

    ```python
    from runnel import Dataflow, op, sources
    flow = Dataflow("eg")
    s = op.input("in", flow, sources.file("data.jsonl"))  # s is a Stream
    ```
    """

    __slots__ = ("flow", "_n", "_step_id")

    def __init__(self, flow, n, step_id):
        self.flow = flow
        self._n = n
        self._step_id = step_id

    def __repr__(self):
        return f"Stream(from step {self._step_id!r})"

