"""List the installed packages whose version differs from a lock file (``make test-latest``).

Usage: python tools/lock_drift.py requirements/lock.txt

Prints one line per package, ``name lock-version -> installed-version`` (``-`` where a side has
none), so a failing ``make test-latest`` run names the releases that changed under it.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" not in line:
            sys.exit(f"{path}:{number}: expected an exact pin 'name==version', found {line!r}")
        name, version = line.split("==", 1)
        pins[canonical(name.split("[")[0])] = version.split(";")[0].strip()
    return pins


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/lock_drift.py LOCK_FILE")
    lock = Path(sys.argv[1])
    if not lock.is_file():
        sys.exit(f"{lock}: no such lock file")
    pins = locked_versions(lock)
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    changed = [(n, pins[n], installed.get(n, "-")) for n in sorted(pins) if installed.get(n) != pins[n]]
    added = sorted(n for n in set(installed) - set(pins) if n not in ("deltatune", "pip", "setuptools", "wheel"))
    print(f"{len(changed)} package(s) differ from {lock}:" if changed else f"every locked package is at its {lock} version")
    for name, old, new in changed:
        print(f"  {name} {old} -> {new}")
    if added:
        print(f"not in the lock: {', '.join(added)}")


if __name__ == "__main__":
    main()
