#!/usr/bin/env python3
"""Compare two replay outputs as multisets of items.

    python3 tests/oracle/compare.py A B

A and B hold `{"step": ..., "item": ...}` lines (from `runnel replay` and
`flows/bytewax_adapter.py`). Order does not matter. Lines are compared after
canonicalizing their JSON: object keys sorted, floats rounded to 9
significant digits, floats below 1e-12 in magnitude and -0.0 read as 0.0;
ints and floats stay distinct (`21` != `21.0`). Lines left unmatched are
then paired if all their floats agree within a relative tolerance of 1e-9
(absolute 1e-12 near zero), which catches values that round differently at
the 9th digit.

Prints the number of lines per step in each file, then what is only in A and
only in B. Exit status: 0 if equal, 1 if not, 2 on bad input.
"""

import json
import math
import sys
from collections import Counter

REL_TOL = 1e-9
ABS_TOL = 1e-12
SHOW = 40  # lines shown per side


def canon(v):
    if isinstance(v, float):
        if abs(v) < ABS_TOL:
            return 0.0
        return float(f"{v:.9g}")
    if isinstance(v, list):
        return [canon(x) for x in v]
    if isinstance(v, dict):
        return {k: canon(x) for k, x in v.items()}
    return v


def canon_text(v):
    return json.dumps(canon(v), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def close(a, b):
    """Structural equality with float tolerance; ints and floats differ."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    return a == b


def load(path):
    """Counter of canonical line text, dict of text -> parsed line."""
    counts, parsed = Counter(), {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise SystemExit(f"compare.py: {path}:{lineno}: not JSON: {line.rstrip()[:200]}")
            if not isinstance(obj, dict) or "step" not in obj or "item" not in obj:
                raise SystemExit(f'compare.py: {path}:{lineno}: not a {{"step", "item"}} object: {line.rstrip()[:200]}')
            text = canon_text(obj)
            counts[text] += 1
            parsed[text] = obj
    return counts, parsed


def step_of(text, parsed):
    return str(parsed[text]["step"])


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path_a, path_b = argv[1], argv[2]
    try:
        a, pa = load(path_a)
        b, pb = load(path_b)
    except OSError as ex:
        print(f"compare.py: {ex}", file=sys.stderr)
        return 2
    except SystemExit as ex:
        print(ex, file=sys.stderr)
        return 2

    steps_a = Counter()
    for t, n in a.items():
        steps_a[step_of(t, pa)] += n
    steps_b = Counter()
    for t, n in b.items():
        steps_b[step_of(t, pb)] += n
    print(f"lines per step (A = {path_a}, B = {path_b}):")
    for step in sorted(set(steps_a) | set(steps_b)):
        mark = "" if steps_a[step] == steps_b[step] else "   <- differs"
        print(f"  {step}: A {steps_a[step]}, B {steps_b[step]}{mark}")

    only_a = a - b
    only_b = b - a
    # Pair leftovers that agree within the float tolerance.
    for ta in list(only_a):
        for tb in list(only_b):
            if only_a[ta] == 0:
                break
            if only_b[tb] and close(pa[ta], pb[tb]):
                n = min(only_a[ta], only_b[tb])
                only_a[ta] -= n
                only_b[tb] -= n
    only_a = +only_a
    only_b = +only_b

    if not only_a and not only_b:
        print(f"equal: {sum(a.values())} lines")
        return 0

    for name, path, only, parsed in (("A", path_a, only_a, pa), ("B", path_b, only_b, pb)):
        total = sum(only.values())
        print(f"only in {name} ({path}): {total} line(s)")
        shown = 0
        for text in sorted(only, key=lambda t: (step_of(t, parsed), t)):
            if shown >= SHOW:
                print(f"  ... and {total - shown} more")
                break
            n = only[text]
            print(f"  {'%dx ' % n if n > 1 else ''}{text}")
            shown += n
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
