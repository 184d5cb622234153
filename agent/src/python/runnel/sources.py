"""Sources: where a flow's input steps read items from.

Every source decodes its bytes into items in Rust; a malformed record is
counted, logged with where it came from (file and line), and skipped.
"""

from typing import Optional

__all__ = ["Source", "file"]

_DECODES = ("jsonl", "csv")


class Source:
    """Base class of all runnel sources; build one with a function of this
    module, e.g. `sources.file("data.jsonl")`.

    ```python
    src = sources.file("readings.jsonl")
    assert isinstance(src, sources.Source)
    ```
    """

    kind = "?"


class _FileSource(Source):
    kind = "file"

    def __init__(self, path, decode):
        self.path = path
        self.decode = decode

    def __repr__(self):
        return f"sources.file({self.path!r}, decode={self.decode!r})"


def file(path: str, decode: Optional[str] = None) -> Source:
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
    import os

    if not isinstance(path, str) or not path:
        raise TypeError(f"sources.file: `path` must be a non-empty str; got {path!r}")
    if decode is None:
        decode = "csv" if path.lower().endswith(".csv") else "jsonl"
    if decode not in _DECODES:
        raise ValueError(f"sources.file({path!r}): `decode` must be one of {', '.join(_DECODES)}; got {decode!r}")
    return _FileSource(os.fspath(path), decode)
