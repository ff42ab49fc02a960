"""The control socket of a real whisperd with no workers (so every job stays PENDING): framing, bad input,
the queue limit, cancel, permissions by SO_PEERCRED, and durability across restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.users import as_user
from whisperctl.client import RemoteError
from whisperd import protocol as p
from whisperd.jobs import JobState

NOBODY = 65534


def raw(daemon: DaemonProcess, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw bytes as socat would and read one reply per line sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        replies: list[dict[str, Any]] = []
        buffer = b""
        for line in lines:
            sock.sendall(line)
            while b"\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, "daemon closed the connection"
                buffer += chunk
            reply, _, buffer = buffer.partition(b"\n")
            replies.append(json.loads(reply))
        return replies


def audio_file(daemon: DaemonProcess, speech: dict[str, Path], name: str = "fox") -> Path:
    """A copy of a clip that any user may read."""
    path = daemon.socket.parent / f"{name}.wav"
    shutil.copy(speech[name], path)
    path.chmod(0o644)
    return path


def test_ping_from_a_raw_line(idle_daemon: DaemonProcess) -> None:
    [pong] = raw(idle_daemon, b'{"op": "ping"}\n')
    assert pong["ok"] is True and pong["reply"] == "pong" and pong["protocol"] == p.PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", "bad_request"),
        (b'{"op": "reboot"}\n', "unknown_op"),
        (b'{"no_op": 1}\n', "unknown_op"),
        (b'{"op": "status", "ids": "seven"}\n', "bad_request"),
        (b'{"op": "status", "colour": "red"}\n', "bad_request"),
        (b'{"op": "status", "limit": 0}\n', "bad_request"),
        (b'{"op": "submit", "files": [{"name": "x", "fd_index": 0}]}\n', "bad_request"),
        (b'{"op": "result", "id": 999}\n', "not_found"),
        (
            b'{"op": "submit", "files": [{"name": "x", "path": "/x"}], "priority": 18446744073709551615}\n',
            "bad_request",
        ),
    ],
)
def test_bad_requests_get_an_error_and_the_connection_goes_on(
    idle_daemon: DaemonProcess, line: bytes, code: str
) -> None:
    error, pong = raw(idle_daemon, line, b'{"op": "ping"}\n')
    assert error["ok"] is False and error["error"]["code"] == code and error["error"]["message"]
    assert pong["reply"] == "pong"


def test_an_oversized_request_is_refused_and_the_daemon_serves_on(idle_daemon: DaemonProcess) -> None:
    huge = b'{"op": "status", "ids": [' + b"1," * 600_000 + b"1]}\n"
    [error] = raw(idle_daemon, huge)
    assert error["error"]["code"] == "request_too_large"
    assert idle_daemon.client.ping().protocol == p.PROTOCOL_VERSION


def test_the_queue_limit_refuses_more_and_keeps_what_it_has(
    idle_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    jobs = idle_daemon.client.submit([str(speech["fox"])] * 5)  # the limit is 5
    with pytest.raises(RemoteError) as refused:
        idle_daemon.client.submit([str(speech["fox"])])
    assert refused.value.code == "queue_full" and "limit of 5" in refused.value.message
    assert [j.state for j in idle_daemon.client.status([j.id for j in jobs])] == [JobState.PENDING] * 5
    idle_daemon.client.cancel([jobs[0].id])
    assert len(idle_daemon.client.submit([str(speech["fox"])])) == 1, "room again after a cancel"


def test_cancel_a_pending_job_and_its_history(idle_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    [job] = idle_daemon.client.submit([str(speech["fox"])])
    out = idle_daemon.ctl("cancel", str(job.id))
    assert out.returncode == 0 and f"job {job.id} CANCELLED" in out.stdout
    final = idle_daemon.job(job.id)
    assert final.state is JobState.CANCELLED and final.started_at is None and final.finished_at is not None
    with sqlite3.connect(idle_daemon.state_dir / "jobs.sqlite3") as db:
        events = db.execute("SELECT from_state, to_state, event FROM job_events WHERE job_id = ?", (job.id,))
        assert list(events) == [(None, "PENDING", "submit"), ("PENDING", "CANCELLED", "cancel")]
    # dropped once the cancel is durable: a flush after the commit, not before
    spool = idle_daemon.state_dir / "spool"
    idle_daemon.wait_for(lambda: list(spool.iterdir()) == [], 10, "a cancelled job's audio dropped")
    missing = idle_daemon.ctl("cancel", "4242")
    assert missing.returncode == 2 and "no job 4242" in missing.stderr


def test_status_selects_by_ids_state_and_limit(idle_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    a, b, c = idle_daemon.client.submit([str(speech["fox"])] * 3)
    idle_daemon.client.cancel([b.id])
    client = idle_daemon.client
    assert [j.id for j in client.status([c.id, a.id])] == [c.id, a.id]
    assert [j.id for j in client.status([a.id, b.id], state="CANCELLED")] == [b.id]
    assert [j.id for j in client.status(state="PENDING")] == [a.id, c.id]
    assert [j.id for j in client.status(limit=2)] == [b.id, c.id]
    with pytest.raises(RemoteError, match="no job 99"):
        client.status([a.id, 99])


def test_another_user_sees_the_queue_but_cannot_touch_other_jobs(
    idle_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    clip = audio_file(idle_daemon, speech)
    [mine] = idle_daemon.client.submit([str(clip)])
    client = idle_daemon.client
    seen = as_user(NOBODY, lambda: [j.id for j in client.status()])
    assert seen == {"ok": [mine.id]}
    assert as_user(NOBODY, lambda: client.cancel([mine.id]).errors[0].code) == {"ok": "permission_denied"}
    assert as_user(NOBODY, lambda: client.result(mine.id))["error"] == "permission_denied"
    by_path = as_user(NOBODY, lambda: client.request(
        __import__("whisperd.protocol").protocol.Submit(
            files=[__import__("whisperd.protocol").protocol.SubmitFile(name="x", path=str(clip))]
        ), object,  # type: ignore[arg-type]
    ))  # fmt: skip
    assert by_path["error"] == "permission_denied"
    theirs = as_user(NOBODY, lambda: [j.id for j in client.submit([str(clip)])])["ok"]
    assert idle_daemon.job(theirs[0]).owner_uid == NOBODY
    assert as_user(NOBODY, lambda: [j.state for j in client.cancel(theirs).jobs]) == {"ok": ["CANCELLED"]}
    assert idle_daemon.job(mine.id).state is JobState.PENDING
    assert client.cancel([mine.id]).jobs[0].state is JobState.CANCELLED, "root may cancel"


def test_root_may_submit_by_path(idle_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    from whisperd import protocol as p

    reply = idle_daemon.client.request(
        p.Submit(files=[p.SubmitFile(name="by-path", path=str(speech["fox"]))]), p.Jobs
    )
    assert reply.jobs[0].filename == "by-path" and reply.jobs[0].state is JobState.PENDING
    with pytest.raises(RemoteError, match="no such file"):
        idle_daemon.client.request(p.Submit(files=[p.SubmitFile(name="x", path="/nonexistent.wav")]), p.Jobs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_queued_jobs_survive_a_restart(tmp_path: Path, speech: dict[str, Path], sig: int) -> None:
    config = {"workers": {"cpu_workers": 0}}
    daemon = DaemonProcess(tmp_path / "state", config).start()
    jobs = daemon.client.submit([str(speech["fox"]), str(speech["weather"])], priority=3)
    daemon.stop(sig)
    again = DaemonProcess(tmp_path / "state", config)
    again.socket = daemon.socket  # the same socket path: a stale one left by kill -9 is replaced
    again.client = daemon.client
    again.start()
    try:
        after = again.client.status([j.id for j in jobs])
        assert [(j.id, j.state, j.priority) for j in after] == [(j.id, JobState.PENDING, 3) for j in jobs]
        assert len(list((tmp_path / "state" / "spool").iterdir())) == 2
    finally:
        again.stop()


def test_a_second_daemon_on_the_same_socket_is_refused(idle_daemon: DaemonProcess, tmp_path: Path) -> None:
    second = DaemonProcess(tmp_path / "other", {"workers": {"cpu_workers": 0}})
    second.socket = idle_daemon.socket
    with pytest.raises(RuntimeError, match="already listening"):
        second.start(timeout_s=30)
    assert idle_daemon.client.ping().protocol == p.PROTOCOL_VERSION


def test_sighup_applies_what_it_can_and_names_what_needs_a_restart(
    idle_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    from tests.support.daemon import to_toml

    assert idle_daemon.proc is not None
    idle_daemon.config_path.write_text(
        to_toml({
            "daemon": {"socket_mode": 0o666, "max_queued_jobs": 1},
            "workers": {"cpu_workers": 3},
            "scheduler": {"max_retries": 5, "performance_monitor_interval_s": 0.5},
        })
    )  # fmt: skip
    idle_daemon.proc.send_signal(signal.SIGHUP)
    idle_daemon.wait_for(lambda: "need a restart" in idle_daemon.log(), 10, "the reload")
    assert "changed: daemon.max_queued_jobs, scheduler.max_retries" in idle_daemon.log()
    assert "need a restart, so they keep their running values: workers.cpu_workers" in idle_daemon.log()
    idle_daemon.client.submit([str(speech["fox"])])
    with pytest.raises(RemoteError, match="limit of 1"):
        idle_daemon.client.submit([str(speech["fox"])])
    assert idle_daemon.client.stats().workers == [], "the worker count needs a restart"
    idle_daemon.config_path.write_text("[daemon]\nbogus = 1\n")
    idle_daemon.proc.send_signal(signal.SIGHUP)
    idle_daemon.wait_for(lambda: "the running one stays" in idle_daemon.log(), 10, "the refused reload")
    assert "bogus" in idle_daemon.log() and idle_daemon.client.ping().protocol == p.PROTOCOL_VERSION


def test_the_performance_monitor_logs_a_summary_and_feeds_watchers(
    idle_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    from whisperd import protocol as p

    idle_daemon.client.submit([str(speech["fox"])] * 2)
    idle_daemon.wait_for(lambda: "queue 2 waiting, 0 running (PENDING=2)" in idle_daemon.log(), 5, "summary")
    with idle_daemon.client.watch() as events:
        snapshots = [e for _, e in zip(range(4), events, strict=False) if isinstance(e, p.SystemSnapshot)]
    assert snapshots and snapshots[-1].stats.queue_depth == 2


def test_only_regular_files_are_spooled(idle_daemon: DaemonProcess) -> None:
    """A pipe could block a spooling thread forever, a device fill the spool: both are refused."""
    from whisperctl.client import Connection
    from whisperd import protocol as p

    read_end, write_end = os.pipe()
    try:
        conn = Connection(idle_daemon.socket, 10)
        conn.send(p.Submit(files=[p.SubmitFile(name="pipe", fd_index=0)]), [read_end])
        with pytest.raises(RemoteError, match="regular file") as refused:
            conn.receive()
        assert refused.value.code == "invalid_audio"
        conn.close()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert idle_daemon.client.status() == []
