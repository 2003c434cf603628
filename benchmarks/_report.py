"""Shared output of the benchmark scripts: an aligned key/value table, then (with --json) one JSON
object as the last line."""

from __future__ import annotations

import json
from typing import Any


def print_report(result: dict[str, Any], as_json: bool) -> None:
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if as_json:
        print(json.dumps(result))
