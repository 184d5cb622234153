"""Sources: where a flow's input steps read items from.

Every source decodes its bytes into items in Rust; a malformed record is
counted, logged with where it came from (file and line), and skipped.
"""

from typing import Literal

__all__ = ["Source", "file"]

class Source:
    """Base class of all runnel sources; build one with a function of this
    module, e.g. `sources.file("data.jsonl")`.

    ```python
    src = sources.file("readings.jsonl")
    assert isinstance(src, sources.Source)
    ```
    """

    kind: str

def file(path: str, decode: Literal["jsonl", "csv"] | None = ...) -> Source:
    """Read items from a file, once, from start to end.

    `decode="jsonl"`: one JSON value per line (blank lines are skipped).
    `decode="csv"`: a header row, then one dict per row; cells that read as
    integers or floats become numbers, empty cells `None`, others `str`.
    Without `decode`, a path ending in `.csv` is CSV and anything else JSON
    lines. A relative path is relative to the flow file's folder.

    ```python
    readings = op.input("in", flow, sources.file("captures/greenhouse.jsonl"))
    rows = op.input("rows", flow, sources.file("log.csv", decode="csv"))
    ```
    """
