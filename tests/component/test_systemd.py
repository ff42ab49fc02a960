"""whisperd under systemd: sd_notify and the watchdog, socket activation with systemd-socket-activate, the
unit files checked by systemd-analyze, the journal's structured fields, and `make install`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from itertools import pairwise
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, short_socket_dir, to_toml
from tests.support.datagrams import DatagramSink
from tests.support.journal import FakeJournal
from tests.support.system_state import check_isolated
from whisperctl.client import Client
from whisperd import protocol as p
from whisperd.config import Config
from whisperd.jobs import JobState
from whisperd.systemd import Notifier

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"


class NotifySocket(DatagramSink[str]):
    """What systemd's end of NOTIFY_SOCKET receives, with arrival times."""

    def __init__(self) -> None:
        super().__init__(short_socket_dir() / "notify", lambda data: data.decode())

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, m in self.received for line in m.splitlines() if line.startswith(prefix)]


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


def test_ready_status_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    daemon = DaemonProcess(
        tmp_path / "state",
        {"workers": {"cpu_workers": 1}},
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"},
    )
    daemon.start()
    try:
        deadline = time.monotonic() + 10
        while len(notify_socket.lines("WATCHDOG=1")) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        [(ready_at, _)] = notify_socket.lines("READY=1")
        assert "1 workers up" in daemon.log().split("ready on")[0], "READY=1 only once the workers are up"
        statuses = [line for _, line in notify_socket.lines("STATUS=")]
        assert statuses[0] == "STATUS=recovering the queue and starting workers"
        assert "STATUS=0 waiting, 0 running, 1/1 workers up" in statuses
        pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
        assert len(pings) >= 4 and pings[0] >= ready_at
        gaps = [b - a for a, b in pairwise(pings)]
        assert max(gaps) < 0.4, f"pinged every WATCHDOG_USEC/2 = 0.2 s, not {gaps}"
    finally:
        assert daemon.stop(signal.SIGTERM) == 0
    stopping = notify_socket.lines("STOPPING=1")
    assert len(stopping) == 1 and stopping[0][0] > ready_at


def test_a_blocked_event_loop_stops_petting_the_watchdog(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "100000"})
    interval = notifier.watchdog_interval_s()
    assert interval == pytest.approx(0.05)

    async def scenario() -> tuple[float, float]:
        task = asyncio.create_task(notifier.watchdog(interval))
        await asyncio.sleep(0.3)
        blocked_from = time.monotonic()
        time.sleep(1.0)  # a wedged loop: nothing else on it runs
        blocked_until = time.monotonic()
        await asyncio.sleep(0.3)
        task.cancel()
        return blocked_from, blocked_until

    blocked_from, blocked_until = asyncio.run(scenario())
    time.sleep(0.2)
    pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
    gaps = [b - a for a, b in pairwise(pings)]
    assert sorted(gaps)[-1] >= 0.9, "no WATCHDOG=1 while the loop is blocked for 1 s"
    assert sorted(gaps)[-2] < 0.3, "every 0.05 s otherwise"
    assert any(t < blocked_from for t in pings) and any(t > blocked_until for t in pings)


def test_outside_systemd_it_is_all_silent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s() is None
    notifier.ready("x")  # no socket: nothing is sent, nothing raises


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activation(tmp_path: Path, speech: dict[str, Path]) -> None:
    sock = short_socket_dir() / "activated.sock"
    state_dir = tmp_path / "state"
    config = tmp_path / "whisperd.toml"
    config.write_text(to_toml({"workers": {"cpu_workers": 1}, "metrics": {"enabled": False}}))
    # systemd-socket-activate hands its child only LISTEN_*, PATH, HOME, USER, TERM and what -E names: without
    # these the daemon (root here) would keep its state in /var/lib/whisperd. The socket path must be unused:
    # the daemon is to serve the socket it is passed, not bind its own.
    passed = {"WHISPERD_STATE_DIR": str(state_dir), "WHISPERD_SOCKET": "/nonexistent/unused"}
    passed |= {name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}
    check_isolated(passed)
    command = [
        "systemd-socket-activate",
        "-l",
        str(sock),
        *[arg for name in passed for arg in ("-E", name)],
        sys.executable,
        "-m",
        "whisperd",
        "--config",
        str(config),
    ]
    activator = subprocess.Popen(
        command, env={**os.environ, **passed}, stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("wb")
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = Client(str(sock), timeout_s=120)
        # the first connection starts the daemon; it waits in the backlog
        assert client.ping().protocol == p.PROTOCOL_VERSION
        [job] = client.submit([str(speech["fox"])])
        deadline = time.monotonic() + 120
        while not client.status([job.id])[0].state.terminal and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.status([job.id])[0].state is JobState.COMPLETED
        assert "the socket systemd passed" in (tmp_path / "log").read_text()
    finally:
        activator.send_signal(signal.SIGTERM)
        activator.wait(60)
    # the daemon kept the job in the test's state dir, not in the system's
    with closing(sqlite3.connect(f"file:{state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT event FROM job_events WHERE job_id = ? ORDER BY rowid", (job.id,)
        ).fetchall()
    events = [event for (event,) in rows]
    assert events[0] == "submit" and events[-1] == "complete", events


def units_for_verify(tmp_path: Path) -> Path:
    """The shipped units, with ExecStart pointing at this checkout's whisperd (verify checks it exists)."""
    folder = tmp_path / "units"
    folder.mkdir()
    whisperd = Path(sys.executable).with_name("whisperd")
    for unit in ("whisperd.service", "whisperd.socket"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/whisperd", str(whisperd))
        (folder / unit).write_text(text)
    return folder


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    folder = units_for_verify(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "whisperd.socket", "whisperd.service"],
        cwd=folder, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    # 1.6 today; a GPU service cannot have PrivateDevices= or MemoryDenyWriteExecute=, so 2.0 is the bar
    # (--threshold counts in tenths).
    folder = units_for_verify(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager", "whisperd.service"],
        cwd=folder, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for whisperd.service: 1." in result.stdout


def unit_settings(name: str) -> dict[str, list[str]]:
    """Every Key=value of a shipped unit file, whatever its section, in order."""
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_units_keep_the_daemons_files_private_and_socket_users_apart() -> None:
    service, sock = unit_settings("whisperd.service"), unit_settings("whisperd.socket")
    assert service["UMask"] == ["0077"] and service["StateDirectoryMode"] == ["0700"]
    # the socket's group reaches the socket only, never the daemon's files (group whisperd)
    assert sock["SocketGroup"] == ["whisperd-clients"] and service["Group"] == ["whisperd"]
    assert sock["SocketMode"] == ["0660"]
    assert sock["DirectoryMode"] == service["RuntimeDirectoryMode"] == ["0755"], "clients traverse the dir"
    assert service["OOMPolicy"] == ["continue"], "the kernel killing one worker must not stop the service"
    [start_s] = service["TimeoutStartSec"]
    assert float(start_s) > Config().workers.start_timeout_s + 30, "READY=1 waits for the workers to start"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="needs root, systemd-sysusers and systemd-tmpfiles",
)
def test_sysusers_and_tmpfiles_make_a_client_group_and_private_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for folder, unit in (("sysusers.d", "whisperd.sysusers"), ("tmpfiles.d", "whisperd.tmpfiles")):
        (root / "usr/lib" / folder).mkdir(parents=True)
        shutil.copy(UNITS / unit, root / "usr/lib" / folder / "whisperd.conf")
    (root / "etc").mkdir()
    for command in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        result = subprocess.run([*command, f"--root={root}"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    passwd = {f[0]: f for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())}
    group = {f[0]: f for f in (line.split(":") for line in (root / "etc/group").read_text().splitlines())}
    assert "whisperd-clients" in group and group["whisperd-clients"][3] == "", "no member by default"
    uid, gid = int(passwd["whisperd"][2]), int(group["whisperd"][2])
    modes = {}
    for path in ("var/lib/whisperd", "var/lib/whisperd/spool", "run/whisperd"):
        st = (root / path).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), path
        modes[path] = stat.S_IMODE(st.st_mode)
    assert modes == {"var/lib/whisperd": 0o700, "var/lib/whisperd/spool": 0o700, "run/whisperd": 0o755}


def can_make_mount_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_make_mount_namespaces(), reason="needs root and mount namespaces")
def test_journal_records_carry_the_job_fields(tmp_path: Path, speech: dict[str, Path]) -> None:
    run_systemd = tmp_path / "run-systemd"
    journal = FakeJournal(run_systemd)
    log_file = tmp_path / "stderr.log"
    log_file.touch()
    st = log_file.stat()
    daemon = DaemonProcess(
        tmp_path / "state",
        {"workers": {"cpu_workers": 1}},
        env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
    )
    daemon.log_path = log_file  # stderr is the "journal stream"
    command = (
        f"mount --bind {run_systemd} /run/systemd && exec {sys.executable} -m whisperd "
        f"--config {daemon.config_path}"
    )
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", command],
        env=daemon.env,
        stderr=log_file.open("ab"),
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                daemon.client.ping()
                break
            except Exception:
                time.sleep(0.1)
        [job] = daemon.client.submit([str(speech["fox"])])
        daemon.wait_terminal([job.id])
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        journal.close()
    mine = [r for r in journal.records if r.get("JOB_ID") == str(job.id)]
    assert [r["JOB_STATE"] for r in mine] == ["PENDING", "PROCESSING", "COMPLETED"], mine
    assert all(r["MODEL"] == "tiny.en" and r["SYSLOG_IDENTIFIER"] == "whisperd" for r in mine)
    assert mine[-1]["DEVICE"] == "cpu" and mine[-1]["WORKER"] == "cpu0"
    assert mine[0]["PRIORITY"] == "6" and "job" in mine[0]["MESSAGE"]
    assert any(r.get("WORKER") == "cpu0" and "started" in r["MESSAGE"] for r in journal.records)
    assert log_file.read_text().count("PENDING ->") == 0, "under journald, records go to the journal only"


def test_make_install_lays_out_the_service(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    result = subprocess.run(
        ["make", "install", f"DESTDIR={stage}", "PREFIX=/opt/whisperd", "PIP_FLAGS=--no-deps",
         f"PYTHON={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    service = (stage / "opt/whisperd/lib/systemd/system/whisperd.service").read_text()
    assert "ExecStart=/opt/whisperd/bin/whisperd --config /etc/whisperd/whisperd.toml" in service
    for path in (
        "opt/whisperd/bin/whisperd", "opt/whisperd/bin/whisperctl",
        "opt/whisperd/lib/systemd/system/whisperd.socket",
        "opt/whisperd/lib/sysusers.d/whisperd.conf", "opt/whisperd/lib/tmpfiles.d/whisperd.conf",
        "etc/whisperd/whisperd.toml", "opt/whisperd/share/whisperd/prometheus/whisperd-rules.yml",
    ):  # fmt: skip
        assert (stage / path).is_file(), path
