"""What `make upgrade-check` reports: how an environment's versions differ from a lock.

Owns: parsing the ``name==version`` pins of a pip lock file (hash lines and comments ignored)
and comparing them with what an environment has installed, read from that environment's own
``pip freeze``. Read-only: it changes neither the lock nor the environment.

    python -m chatloop.lockdiff requirements.lock .venv-upgrade
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    """PEP 503 name: case and runs of '-', '_', '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements/lock file, by canonical name."""
    pins = {}
    for line in text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def diff(locked: dict[str, str], installed: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, locked, installed) for each package whose version differs; '-' where one is absent."""
    rows = []
    for name in sorted(set(locked) | set(installed)):
        old, new = locked.get(name, "-"), installed.get(name, "-")
        if old != new:
            rows.append((name, old, new))
    return rows


def frozen(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "pip"), "freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    return parse_pins(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m chatloop.lockdiff LOCKFILE VENV", file=sys.stderr)
        return 2
    locked = parse_pins(Path(args[0]).read_text())
    installed = frozen(Path(args[1]))
    for name in ("torch", "pip"):  # outside the lock on purpose (torch's build differs by machine)
        installed.pop(name, None)
    rows = diff(locked, installed)
    if not rows:
        print(f"{args[1]} has exactly the versions of {args[0]}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'package':<{width}}  {'locked':>12}  {'newest':>12}")
    for name, old, new in rows:
        print(f"{name:<{width}}  {old:>12}  {new:>12}")
    print(f"{len(rows)} package(s) differ from {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
