"""The machine's own whisperd state, which tests must never touch: snapshots to compare before and after a
test run (see conftest), and the check that a daemon's environment points elsewhere."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# where a whisperd running as root keeps its state and its socket by default (whisperd.config)
SYSTEM_PATHS = (Path("/var/lib/whisperd"), Path("/run/whisperd"))

Snapshot = dict[Path, tuple[int, int]]


def snapshot(roots: Iterable[Path]) -> Snapshot:
    """(mtime_ns, size) of every file and directory under the roots, the roots included; a missing root
    contributes nothing. Symbolic links are recorded, not followed."""
    found: Snapshot = {}

    def record(path: Path) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:  # gone while we looked
            return
        found[path] = (st.st_mtime_ns, st.st_size)

    for root in roots:
        if not os.path.lexists(root):
            continue
        record(root)
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                record(Path(folder) / name)
    return found


def changed(before: Snapshot, after: Snapshot) -> list[Path]:
    """The paths added, removed or modified between two snapshots, sorted."""
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))


def is_system_path(path: str | Path) -> bool:
    """Whether path is, or lies under, one of SYSTEM_PATHS (after resolving symlinks and ..)."""
    resolved = Path(path).resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in SYSTEM_PATHS)


def check_isolated(env: Mapping[str, str]) -> None:
    """Raise unless env gives whisperd its own state dir and socket, away from the machine's: without
    WHISPERD_STATE_DIR or WHISPERD_SOCKET a daemon run as root would use /var/lib/whisperd and
    /run/whisperd/whisperd.sock."""
    for name in ("WHISPERD_STATE_DIR", "WHISPERD_SOCKET"):
        value = env.get(name, "")
        if not value:
            raise RuntimeError(f"refusing to run whisperd without {name}: it would use the system default")
        if is_system_path(value):
            raise RuntimeError(f"refusing to run whisperd with {name}={value}: that is the system's")
