"""Does the workers' sandbox (whisperd/sandbox.py) let CUDA start on this machine? And if not, what does it
need? Each variant runs in a child process that confines itself as a worker does, then starts CUDA (through
PyTorch where it is installed, else CTranslate2) and allocates on the GPU.

    python3 bench/gpu_sandbox_check.py      # on a machine with an NVIDIA GPU

It first lists what an unconfined CUDA start keeps open (device nodes, shared memory), then tries: a CUDA
worker's sandbox as shipped; a CPU worker's; each half alone; and the shipped rules plus each candidate
path, so that what a driver needs shows up by name. Exits non-zero when the shipped sandbox stops CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
variant = json.loads(sys.argv[2])
from whisperd import sandbox
if variant.get("confine", True):
    rules = sandbox.worker_rules(
        [], variant.get("read", []), variant.get("write", []), False, cuda=variant.get("cuda", True)
    )
    if variant.get("no_seccomp"):
        sandbox._deny_unix_sockets = lambda libc, allow=False: "seccomp skipped"
    if variant.get("no_landlock"):
        sandbox.landlock_abi = lambda: 0
    print("confined:", sandbox.confine(rules), flush=True)
try:
    import torch
    x = torch.ones(1024, device="cuda")
    print("OK torch", float(x.sum()), flush=True)
except ImportError:
    import ctranslate2
    print("OK ctranslate2 devices", ctranslate2.get_cuda_device_count(), flush=True)
if variant.get("list_open"):
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            print("open:", os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        fields = [line.split() for line in maps]
        prefixes = ("/dev", "/run", "/tmp", "/var")
        seen = sorted({f[-1] for f in fields if len(f) > 5 and f[-1].startswith(prefixes)})
    for path in seen:
        print("mapped:", path)
"""

CANDIDATES = ["/proc", "/dev/shm", "/run", "/tmp", "/var", "/dev"]


def run(name: str, variant: dict[str, object]) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), json.dumps(variant)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    ok = "OK " in out.stdout
    print(f"--- {name}: {'works' if ok else 'FAILS'}")
    lines = (out.stdout + out.stderr).strip().splitlines()
    print("\n".join(lines if variant.get("list_open") else lines[-4:]))
    return ok


def main() -> int:
    print(f"kernel {os.uname().release}; python {sys.version.split()[0]}")
    if "--quick" not in sys.argv:
        run("unconfined (what CUDA keeps open)", {"confine": False, "list_open": True})
    shipped = run("a CUDA worker's sandbox, as shipped", {})
    # What each part costs, for a driver that needs more: measured on an H200 (driver 580), CUDA needed a
    # Unix socket (any errno from the filter failed cuInit with error 304) and write access to its own /proc.
    run("a CPU worker's sandbox (no Unix sockets)", {"cuda": False})
    run("no_new_privs alone (neither Landlock nor seccomp)", {"no_seccomp": True, "no_landlock": True})
    run("Landlock alone", {"no_seccomp": True})
    run("seccomp alone", {"no_landlock": True})
    for path in CANDIDATES:
        run(f"the shipped sandbox + read/write {path}", {"write": [path]})
    return 0 if shipped else 1


if __name__ == "__main__":
    sys.exit(main())
