"""Shared output of the benchmark scripts: an aligned key/value table, then (with --json) one JSON
object as the last line."""

from __future__ import annotations

import json
from typing import Any


def print_report(result: dict[str, Any], as_json: bool) -> None:
    """Scalars as ``key  value`` lines; a value that is a list of objects (one per variant) as a
    table of its own below them, one row per key, one column per object."""
    tables = {k: v for k, v in result.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    scalars = {k: v for k, v in result.items() if k not in tables}
    width = max((len(k) for k in scalars), default=0)
    for k, v in scalars.items():
        print(f"{k:<{width}}  {v}")
    for name, objects in tables.items():
        keys = list(dict.fromkeys(k for o in objects for k in o))
        cells = [[str(o.get(k, "")) for o in objects] for k in keys]
        kw = max(len(name), *(len(k) for k in keys))
        cw = [max(len(c[i]) for c in cells) for i in range(len(objects))]
        print()
        for k, row in zip(keys, cells):
            print(f"{k if k else name:<{kw}}  " + "  ".join(f"{c:<{w}}" for c, w in zip(row, cw)))
    if as_json:
        print(json.dumps(result))
