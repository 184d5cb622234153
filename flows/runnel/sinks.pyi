"""Sinks: where a flow's output steps write items to.

Items are written as JSON: tuples become arrays, datetimes RFC 3339 text,
`WindowMetadata` an object, and anything else its `repr()`.
"""

__all__ = ["Sink", "stdout", "file"]

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
