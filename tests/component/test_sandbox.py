"""The worker sandbox (whisperd.sandbox) applied in a child process, which then tries what a compromised
worker would: read the daemon's files, write anywhere, reach the control socket or the network, signal the
daemon. What it needs stays open: Python's imports, a model directory it was given, /dev/null."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from whisperd.sandbox import landlock_abi

ABI = landlock_abi()

CHILD = r"""
import json, os, signal, socket, sys
from whisperd import sandbox

state, models, control, port, downloads, cuda = sys.argv[1:7]
done = sandbox.confine(sandbox.worker_rules([models], [], [], downloads=downloads == "1", cuda=cuda == "1"))

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return exc.strerror or str(exc)

def unix():
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(control)

def tcp():
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        pass

print(json.dumps({
    "done": done,
    "read state": attempt(lambda: open(os.path.join(state, "jobs.sqlite3"), "rb").read()),
    "list state": attempt(lambda: os.listdir(state)),
    "write state": attempt(lambda: open(os.path.join(state, "new"), "wb")),
    "write tmp": attempt(lambda: open("/tmp/whisperd-sandbox-test", "wb")),
    "read model": attempt(lambda: open(os.path.join(models, "model.bin"), "rb").read()),
    "read parent": attempt(lambda: open(f"/proc/{os.getppid()}/environ", "rb").read()),
    "signal parent": attempt(lambda: os.kill(os.getppid(), 0)),
    "unix socket": attempt(unix),
    "tcp": attempt(tcp),
    "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
    "write /dev/null": attempt(lambda: open("/dev/null", "wb").write(b"x")),
    "name itself": attempt(lambda: open("/proc/self/comm", "w").write("worker")),
    "import numpy": attempt(lambda: __import__("numpy")),
    "https": attempt(lambda: socket.create_connection(("127.0.0.1", 443), timeout=5).close()),
    "write hub cache": attempt(lambda: open(os.path.join(os.environ["HF_HOME"], "x"), "wb").close()),
}))
"""


def confined(tmp_path: Path, downloads: bool, cuda: bool = False) -> dict[str, object]:
    state, models = tmp_path / "state", tmp_path / "models"
    state.mkdir()
    models.mkdir()
    (state / "jobs.sqlite3").write_bytes(b"SQLite format 3\0")
    (models / "model.bin").write_bytes(b"weights")
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(tmp_path / "control.sock"))
    control.listen()
    tcp = socket.create_server(("127.0.0.1", 0))
    try:
        port = str(tcp.getsockname()[1])
        argv = [sys.executable, "-c", CHILD, str(state), str(models), str(tmp_path / "control.sock"), port]
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
        argv += ["1" if downloads else "0", "1" if cuda else "0"]
        child = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    finally:
        control.close()
        tcp.close()
    assert child.returncode == 0, child.stderr
    result: dict[str, object] = json.loads(child.stdout)
    return result


@pytest.fixture
def outcome(tmp_path: Path) -> dict[str, object]:
    return confined(tmp_path, downloads=False)


@pytest.mark.skipif(ABI == 0, reason="this kernel has no Landlock (Linux 5.13 or later, landlock enabled)")
def test_a_confined_process_cannot_reach_the_daemons_files(outcome: dict[str, object]) -> None:
    denied = "Permission denied"
    assert outcome["read state"] == denied
    assert outcome["list state"] == denied
    assert outcome["write state"] == denied
    assert outcome["write tmp"] == denied
    assert outcome["read parent"] == denied
    assert outcome["read model"] == "ok", "a model directory it was given stays readable"
    assert outcome["write /dev/null"] == "ok"
    assert outcome["name itself"] == "ok", (
        "its own /proc entries stay writable (the CUDA driver writes there)"
    )
    assert outcome["import numpy"] == "ok", "imports after the sandbox still work"


def test_a_confined_process_cannot_open_unix_sockets(outcome: dict[str, object]) -> None:
    if not any("seccomp: no Unix sockets" in note for note in outcome["done"]):  # type: ignore[attr-defined]
        pytest.skip(f"no seccomp filter here: {outcome['done']}")
    assert outcome["unix socket"] == "Permission denied"
    assert outcome["udp"] == "ok", "other sockets are not the filter's business"


@pytest.mark.skipif(ABI < 4, reason="Landlock restricts TCP from ABI 4 (Linux 6.7)")
def test_a_confined_process_cannot_connect_over_tcp(outcome: dict[str, object]) -> None:
    assert outcome["tcp"] == "Permission denied"
    assert outcome["https"] == "Permission denied"
    assert outcome["write hub cache"] != "ok"


@pytest.mark.skipif(ABI < 4, reason="Landlock restricts TCP from ABI 4 (Linux 6.7)")
def test_models_fetched_by_name_open_https_and_the_hub_cache_only(tmp_path: Path) -> None:
    outcome = confined(tmp_path, downloads=True)
    assert outcome["https"] == "Connection refused", "allowed through; nothing listens on 443 here"
    assert outcome["write hub cache"] == "ok"
    assert outcome["tcp"] == "Permission denied", "any other port stays closed"
    assert outcome["write tmp"] == "Permission denied"


@pytest.mark.skipif(ABI < 6, reason="Landlock scopes signals from ABI 6 (Linux 6.12)")
def test_a_confined_process_cannot_signal_the_daemon(outcome: dict[str, object]) -> None:
    assert outcome["signal parent"] == os.strerror(1)  # EPERM


def test_a_cuda_worker_keeps_unix_sockets_and_nothing_else(tmp_path: Path) -> None:
    """Its driver fails to start without a Unix socket (seen on an H200: bench/gpu_sandbox_check.py); the
    daemon refuses its workers on the control socket instead (tests/component/test_worker_peers.py)."""
    outcome = confined(tmp_path, downloads=False, cuda=True)
    assert outcome["unix socket"] == "ok"
    if ABI:
        assert outcome["read state"] == "Permission denied" and outcome["write tmp"] == "Permission denied"
