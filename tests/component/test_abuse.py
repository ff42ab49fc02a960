"""A hostile or careless client against a real whisperd with no workers (every job stays PENDING): floods of
descriptors and connections, requests that would cost far more than their size, clients that never read,
names that would rewrite a terminal, symlinks and FIFOs by path. After each the daemon still answers, and
it logs no traceback for any of it. (test_abuse_offline.py: what needs no daemon process.)"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.users import as_user
from whisperctl.client import Client, RemoteError
from whisperd import protocol as p
from whisperd.jobs import JobState

NOBODY = 65534
HOG = 65533  # another unprivileged uid: root is exempt from the connection cap
MAX_CONNECTIONS = 8
FDS_PER_MESSAGE = 64
AUDIO = b"RIFF not really audio, but no worker will ever decode it"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(
        tmp_path_factory.mktemp("abuse") / "state",
        {
            "daemon": {
                "socket_mode": 0o666,
                "max_queued_jobs": 1000,
                "max_connections_per_uid": MAX_CONNECTIONS,
                "send_timeout_s": 1.0,
            },
            "workers": {"cpu_workers": 0},
        },
    ).start()
    yield daemon
    daemon.stop()
    assert "Traceback" not in daemon.log(), "a client's doing must never log a traceback"


@pytest.fixture
def audio(daemon: DaemonProcess) -> Path:
    path = daemon.socket.parent / "clip.wav"
    path.write_bytes(AUDIO)
    path.chmod(0o644)
    return path


def open_fds(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def connect(daemon: DaemonProcess, timeout_s: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect(str(daemon.socket))
    return sock


def read_replies(sock: socket.socket, count: int | None = None) -> list[dict[str, Any]]:
    """Reply lines until count of them, or until the daemon closes the connection."""
    buffer, replies = b"", []
    while count is None or len(replies) < count:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        replies += [json.loads(line) for line in lines if line]
    return replies


def ask(daemon: DaemonProcess, line: bytes) -> tuple[dict[str, Any], int]:
    """One request line; its reply and the reply's size in bytes."""
    with connect(daemon, timeout_s=30) as sock:
        sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, "the daemon closed the connection without a reply"
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply, len(data)


def still_serves(daemon: DaemonProcess, audio: Path) -> None:
    assert daemon.client.ping().protocol == p.PROTOCOL_VERSION
    [job] = daemon.client.submit([str(audio)])
    assert job.state is JobState.PENDING
    daemon.client.cancel([job.id])


def wait_until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.02)


# ---- descriptors ---------------------------------------------------------------------------------------


def test_a_descriptor_flood_holds_at_most_two_messages_of_descriptors(
    daemon: DaemonProcess, audio: Path
) -> None:
    baseline = open_fds(daemon)
    peak, sent, cut_off = baseline, 0, 0
    fd = os.open(audio, os.O_RDONLY)
    try:
        while sent < 4000:  # one byte, no newline, 64 descriptors: again and again, reconnecting when cut off
            with connect(daemon) as sock:
                try:
                    while sent < 4000:
                        socket.send_fds(sock, [b"x"], [fd] * FDS_PER_MESSAGE)
                        sent += 1
                        if sent % 25 == 0:
                            peak = max(peak, open_fds(daemon))
                except (BrokenPipeError, ConnectionResetError):
                    cut_off += 1
                replies = read_replies(sock)
                assert [r["error"]["code"] for r in replies] in ([], ["request_too_large"])
            peak = max(peak, open_fds(daemon))
    finally:
        os.close(fd)
    print(f"\n{sent} one-byte messages of {FDS_PER_MESSAGE} descriptors, {cut_off} connections cut off: "
          f"the daemon held at most {peak - baseline} of them (baseline {baseline})")  # fmt: skip
    assert cut_off >= 1
    assert peak - baseline <= 2 * FDS_PER_MESSAGE + 8  # a message's worth pending, the next one refused
    wait_until(lambda: open_fds(daemon) <= baseline)
    still_serves(daemon, audio)


def test_descriptors_sent_to_a_watch_are_closed_at_once(daemon: DaemonProcess, audio: Path) -> None:
    baseline = open_fds(daemon)
    fd = os.open(audio, os.O_RDONLY)
    try:
        with connect(daemon) as watch:
            socket.send_fds(watch, [b'{"op":"watch"}\n'], [fd] * 10)
            assert [r["reply"] for r in read_replies(watch, 2)] == ["device_snapshot", "system_snapshot"]
            for _ in range(100):  # more descriptors on the stream, with and without newlines
                socket.send_fds(watch, [b'{"op":"ping"}\n{'], [fd] * FDS_PER_MESSAGE)
            wait_until(lambda: open_fds(daemon) <= baseline + 1)  # the watch's own socket
            [job] = daemon.client.submit([str(audio)])
            [event] = read_replies(watch, 1)
            assert event["reply"] == "job_event" and event["job"]["id"] == job.id
            daemon.client.cancel([job.id])
    finally:
        os.close(fd)
    wait_until(lambda: open_fds(daemon) <= baseline)


# ---- connections ---------------------------------------------------------------------------------------


def test_connections_per_uid_are_capped_and_other_users_still_get_in(
    daemon: DaemonProcess, audio: Path
) -> None:
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child as HOG: takes every connection it may, one more, and holds them till released
        try:
            os.close(ready_r)
            os.close(release_w)
            os.setgroups([])
            os.setgid(HOG)
            os.setuid(HOG)
            held = []
            for _ in range(MAX_CONNECTIONS):
                sock = connect(daemon)
                sock.sendall(b'{"op":"ping"}\n')
                held.append((sock, read_replies(sock, 1)[0]["reply"]))
            with connect(daemon) as extra:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    extra.sendall(b'{"op":"ping"}\n')
                refused = read_replies(extra)
            try:
                Client(str(daemon.socket), timeout_s=10).ping()
                by_client = "served"
            except RemoteError as exc:
                by_client = exc.code
            result = {"held": [reply for _, reply in held], "refused": refused, "by_client": by_client}
            os.write(ready_w, json.dumps(result).encode())
            os.close(ready_w)
            os.read(release_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(release_r)
    try:
        with os.fdopen(ready_r, "rb") as pipe:
            result = json.loads(pipe.read())
        assert result["held"] == ["pong"] * MAX_CONNECTIONS
        [refused] = result["refused"]
        assert refused["ok"] is False and refused["error"]["code"] == "too_many_connections"
        assert str(MAX_CONNECTIONS) in refused["error"]["message"]
        assert result["by_client"] == "too_many_connections", "whisperctl reads the reason, not a reset"
        client = daemon.client
        assert as_user(NOBODY, lambda: client.ping().protocol) == {"ok": p.PROTOCOL_VERSION}
        still_serves(daemon, audio)  # root
    finally:
        os.write(release_w, b"x")
        os.close(release_w)
        os.waitpid(pid, 0)
    # the hog's connections closed: its uid gets in again
    client = daemon.client
    wait_until(lambda: as_user(HOG, lambda: client.ping().protocol) == {"ok": p.PROTOCOL_VERSION})


def test_root_is_exempt_from_the_connection_cap(daemon: DaemonProcess) -> None:
    held = []
    try:
        for _ in range(2 * MAX_CONNECTIONS):
            held.append(connect(daemon))
        out = daemon.ctl("ping")
        assert out.returncode == 0, out.stderr
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_never_reads_is_disconnected(daemon: DaemonProcess, audio: Path) -> None:
    files = [{"name": "n" * p.MAX_NAME_CHARS, "fd_index": i} for i in range(5)]
    fds = [os.open(audio, os.O_RDONLY) for _ in files]
    try:
        with connect(daemon) as sock:  # five jobs with the longest names: a status reply of about 25 KB
            socket.send_fds(sock, [json.dumps({"op": "submit", "files": files}).encode() + b"\n"], fds)
            jobs = read_replies(sock, 1)[0]["jobs"]
    finally:
        for fd in fds:
            os.close(fd)
    ids = [job["id"] for job in jobs]
    asked = 400  # 10 MB of replies: far beyond what the socket buffers hold
    with connect(daemon, timeout_s=30) as sock:
        status = json.dumps({"op": "status", "ids": ids}).encode() + b"\n"
        sock.sendall(status * asked)
        time.sleep(3)  # past send_timeout_s (1 s) without reading
        assert daemon.client.ping().protocol == p.PROTOCOL_VERSION, "others are served meanwhile"
        replies = read_replies(sock)  # what was buffered, then the end of the stream
    assert 0 < len(replies) < asked
    daemon.client.cancel(ids)
    still_serves(daemon, audio)


# ---- sizes and costs -----------------------------------------------------------------------------------


def _submit(**fields: Any) -> bytes:
    files = fields.pop("files", [{"name": "a.wav", "fd_index": 0}])
    return compact({"op": "submit", "files": files, **fields})


def compact(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (_submit(files=[{"name": "x" * 4097, "fd_index": 0}]), "4096"),
        (_submit(files=[{"name": "a\nWARNING job 1 forged", "fd_index": 0}]), "control characters"),
        (_submit(files=[{"name": "a", "fd_index": 0}] * 1001), "1000"),
        (_submit(language="l" * 17), "16"),
        (compact({"op": "status", "limit": 10_001}), "10000"),
        (compact({"op": "status", "ids": [7] * 250_000}), "10000"),
        (compact({"op": "cancel", "ids": [1] * 450_000}), "10000"),
        (json.dumps({"op": "result", "id": 2**63}).encode(), "9223372036854775807"),
        (json.dumps({"op": "status", "ids": [2**64]}).encode(), "9223372036854775807"),
        (json.dumps({"op": "cancel", "ids": [2**63]}).encode(), "9223372036854775807"),
        (b'{"x":' + b"[" * 1000 + b"]" * 1000 + b',"op":"ping"}', "nested"),
        (b'{"op":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "x"),
    ],
    ids=[
        "name-4097", "name-newline", "files-1001", "language-17", "status-limit", "status-250000-ids",
        "cancel-450000-ids", "result-id-2**63", "status-id-2**64", "cancel-id-2**63", "nesting-before-op",
        "nesting-after-op",
    ],
)  # fmt: skip
def test_requests_beyond_the_bounds_are_bad_requests(
    daemon: DaemonProcess, line: bytes, fragment: str
) -> None:
    assert len(line) < 1024 * 1024, "within max_request_bytes: the bound itself must refuse it"
    reply, size = ask(daemon, line)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert fragment in reply["error"]["message"]
    assert size < 2000, "a short error, not a reply the size of the request times fifty"
    assert "Traceback" not in daemon.log()


def test_many_bad_requests_log_little(daemon: DaemonProcess) -> None:
    before = len(daemon.log())
    line = json.dumps({"op": "result", "id": 2**63}).encode() + b"\n"
    nested = b'{"x":' + b"[" * 1000 + b"]" * 1000 + b',"op":"ping"}\n'
    with connect(daemon, timeout_s=30) as sock:
        sock.sendall((line + nested) * 200)
        replies = read_replies(sock, 400)
    assert {r["error"]["code"] for r in replies} == {"bad_request"}
    assert len(daemon.log()) - before < 10_000, "client mistakes are answered, not logged"
    assert "Traceback" not in daemon.log()


# ---- names and paths -----------------------------------------------------------------------------------


def test_whisperctl_submits_a_file_whose_name_has_control_characters(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    path = tmp_path / "talk\n\x1b[31mred.wav"
    path.write_bytes(AUDIO)
    out = daemon.ctl("submit", str(path))
    assert out.returncode == 0, out.stderr
    job = daemon.job(int(out.stdout))
    assert job.filename.endswith("talk\\x0a\\x1b[31mred.wav")
    status = daemon.ctl("status", str(job.id))
    assert "\x1b" not in status.stdout and status.stdout.count("\n") == 2
    daemon.client.cancel([job.id])


def test_a_path_submit_refuses_symlinks(daemon: DaemonProcess, audio: Path) -> None:
    link = daemon.socket.parent / "link.wav"
    link.symlink_to(audio)
    request = p.Submit(files=[p.SubmitFile(name="link", path=str(link))])
    with pytest.raises(RemoteError) as refused:
        daemon.client.request(request, p.Jobs)
    assert refused.value.code == "bad_request" and "symbolic link" in refused.value.message
    [job] = daemon.client.request(p.Submit(files=[p.SubmitFile(name="real", path=str(audio))]), p.Jobs).jobs
    daemon.client.cancel([job.id])


def test_a_path_submit_of_a_fifo_does_not_block_the_daemon(daemon: DaemonProcess, audio: Path) -> None:
    fifo = daemon.socket.parent / "fifo.wav"
    os.mkfifo(fifo)
    request = p.Submit(files=[p.SubmitFile(name="fifo", path=str(fifo))])
    with pytest.raises(RemoteError) as refused:
        Client(str(daemon.socket), timeout_s=20).request(request, p.Jobs)
    assert refused.value.code == "invalid_audio"
    still_serves(daemon, audio)
