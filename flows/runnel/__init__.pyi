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

from typing import Generic, TypeVar

from . import op as op, sinks as sinks, sources as sources, win as win

__all__ = ["Dataflow", "Stream", "op", "win", "sources", "sinks"]

_X_co = TypeVar("_X_co", covariant=True)

class Dataflow:
    """A dataflow: the graph of steps that one flow file builds.

    `flow_id` names the flow in logs, counters and summary ids; it must be
    unique among the flows an agent runs.

    ```python
    from runnel import Dataflow
    flow = Dataflow("greenhouse")
    ```
    """

    flow_id: str
    def __init__(self, flow_id: str) -> None: ...

class Stream(Generic[_X_co]):
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

    flow: Dataflow
    # Operators build streams; you never call this yourself.
    def __init__(self, flow: Dataflow, n: int, step_id: str) -> None: ...
