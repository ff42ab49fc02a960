"""A real whisperd process for tests: its own state dir and socket, a TOML config, logs in a file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support.system_state import check_isolated
from whisperctl.client import Client, Unreachable
from whisperd import protocol as p
from whisperd.jobs import JobState


def to_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'"{key}" = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def short_socket_dir() -> Path:
    """Unix socket paths are limited to 108 bytes, and pytest's tmp_path is long and private (0700);
    a short directory anyone can traverse lets tests connect as another user."""
    path = Path(tempfile.mkdtemp(prefix="wd-"))
    path.chmod(0o755)
    return path


def running_in_group(pgid: int) -> list[int]:
    """Pids of the group's processes that can still run (zombies cannot, and may wait long for a reaper)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


class DaemonProcess:
    started: list[DaemonProcess] = []  # so that a failed test leaves no daemon behind (see conftest)

    def __init__(self, state_dir: Path, config: Mapping[str, Mapping[str, Any]] | None = None,
                 env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket = short_socket_dir() / "whisperd.sock"
        self.config_path = state_dir / "whisperd.toml"
        self.config_path.write_text(to_toml(config or {}))
        self.log_path = state_dir / "whisperd.log"
        self.metrics_port = free_port()
        self.extra_env = {"WHISPERD_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(str(self.socket), timeout_s=60)

    @property
    def env(self) -> dict[str, str]:
        """The environment for whisperd (and whisperctl); raises if it would point them at the machine's
        own state dir or socket (an `env` passed in can override both)."""
        env = {
            **os.environ,
            "WHISPERD_SOCKET": str(self.socket),
            "WHISPERD_STATE_DIR": str(self.state_dir),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        check_isolated(env)
        return env

    def start(self, timeout_s: float = 90, own_group: bool = False, wait: bool = True) -> DaemonProcess:
        """own_group: in a session of its own, so that kill_group() reaches it and its workers at once;
        wait=False returns as soon as the process is started (to kill it while it starts up)."""
        env = self.env  # refuses before anything starts if whisperd would use the system's state
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "whisperd", "--config", str(self.config_path), "--log-level", "debug"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=own_group,
        )  # fmt: skip
        log.close()
        DaemonProcess.started.append(self)
        if not wait:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"whisperd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.client.ping()
                return self
            except Unreachable:
                time.sleep(0.05)
        raise TimeoutError(f"whisperd did not answer within {timeout_s}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def kill_group(self, timeout_s: float = 30) -> None:
        """kill -9 of the whole process group (started with own_group=True), then wait until none of it is
        left: no process of the old run may overlap the next one."""
        assert self.proc is not None
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not running_in_group(pgid):
                return
            time.sleep(0.01)
        raise TimeoutError(f"process group {pgid} outlived kill -9 by {timeout_s}s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctl(
        self, *args: str, timeout_s: float = 120, user: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """whisperctl as a user runs it."""
        return subprocess.run(
            [sys.executable, "-m", "whisperctl", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip

    def job(self, job_id: int) -> p.JobView:
        return self.client.status([job_id])[0]

    def wait_for(
        self, predicate: Callable[[], bool], timeout_s: float = 120, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"{what} not reached within {timeout_s}s\n--- daemon log ---\n{self.log()[-4000:]}"
        )

    def wait_state(self, job_id: int, *states: JobState, timeout_s: float = 120) -> p.JobView:
        self.wait_for(lambda: self.job(job_id).state in states, timeout_s, f"job {job_id} in {states}")
        return self.job(job_id)

    def wait_terminal(self, ids: list[int], timeout_s: float = 300) -> list[p.JobView]:
        self.wait_for(
            lambda: all(j.state.terminal for j in self.client.status(ids)), timeout_s, f"jobs {ids} done"
        )
        return self.client.status(ids)
