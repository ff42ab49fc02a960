"""A fake libnvidia-ml.so.1 for tests: build it with gcc, drive it through a state file.

Point a process at it with LD_LIBRARY_PATH=<dir holding the built library> and
FAKE_NVML_STATE=<state file>; pynvml then loads it through its normal dlopen("libnvidia-ml.so.1").
The library re-reads the state file on every call, so rewriting it changes what a running process sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"


def gcc_path() -> str | None:
    return shutil.which("gcc")


def build_fake_nvml(out_dir: Path) -> Path:
    """Compile the fake into out_dir/libnvidia-ml.so.1 and return that path."""
    gcc = gcc_path()
    if gcc is None:
        raise RuntimeError("gcc not found: cannot build the fake NVML library")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    cmd = [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-o", str(target), str(SOURCE)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return target


def write_state(
    path: Path,
    gpus: list[Mapping[str, object]],
    init_fail: bool = False,
    *,
    count_fail: bool = False,
    driver: str | None = None,
) -> None:
    """Write the fake's state file: one line per GPU of key=value pairs (see fake_nvml.c).

    The file is replaced atomically so a process reading it concurrently sees old or new, never half.
    """
    header = []
    if init_fail:
        header.append("init_fail=1")
    if count_fail:
        header.append("count_fail=1")
    if driver is not None:
        header.append(f"driver={driver}")
    lines = [*header, *(" ".join(f"{key}={_value(val)}" for key, val in gpu.items()) for gpu in gpus)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def _value(val: object) -> str:
    text = str(int(val)) if isinstance(val, bool) else str(val)
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f"fake NVML state values must be non-empty and without whitespace: {val!r}")
    return text
