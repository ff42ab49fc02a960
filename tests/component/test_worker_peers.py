"""The control socket refuses the daemon's own worker processes and their children: they run as the
daemon's user (so they would pass for it), and a CUDA worker's sandbox must leave Unix sockets open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Set
from typing import Any

from tests.support.daemon import short_socket_dir
from whisperd import protocol as p
from whisperd.server import ControlServer, bind_socket, lineage
from whisperd.watchers import Watchers


class PingHandlers:
    async def handle(self, request: p.Request, caller: object, fds: list[int]) -> p.Reply:
        return p.Pong(version="test")


def ask(worker_pids: Set[int], from_child: bool = False) -> dict[str, Any]:
    """One ping through a real ControlServer, from this process or from a child of it."""

    async def scenario() -> dict[str, Any]:
        server = ControlServer(
            PingHandlers(), Watchers(), lambda: [], 1 << 20, worker_pids=lambda: frozenset(worker_pids)
        )  # type: ignore[arg-type]
        path = short_socket_dir() / "s.sock"
        await server.start(bind_socket(path, 0o600))
        try:
            if from_child:
                code = (
                    "import socket, sys, contextlib\n"
                    "s = socket.socket(socket.AF_UNIX)\n"
                    "s.connect(sys.argv[1])\n"
                    'with contextlib.suppress(OSError): s.sendall(b\'{"op":"ping"}\\n\')\n'
                    "print(s.makefile().readline(), end='')"
                )
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", code, str(path), stdout=subprocess.PIPE
                )
                out, _ = await child.communicate()
                return dict(json.loads(out))
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:  # a refused peer is answered at once, before it writes anything
                line = await asyncio.wait_for(reader.readline(), 0.5)
            except TimeoutError:
                writer.write(b'{"op":"ping"}\n')
                line = await reader.readline()
            reply = json.loads(line)
            with contextlib.suppress(OSError):
                writer.close()
                await writer.wait_closed()
            return dict(reply)
        finally:
            await server.close()

    return asyncio.run(scenario())


def test_a_worker_process_is_refused() -> None:
    reply = ask({os.getpid()})  # this process plays the worker
    assert reply["error"]["code"] == "permission_denied"


def test_a_child_of_a_worker_is_refused() -> None:
    reply = ask({os.getpid()}, from_child=True)
    assert reply["error"]["code"] == "permission_denied"


def test_anyone_else_is_served() -> None:
    assert "error" not in ask({os.getpid() + 10_000_000}, from_child=True)
    assert "error" not in ask(frozenset())


def test_lineage_runs_from_the_process_up_through_its_parents() -> None:
    chain = lineage(os.getpid())
    assert chain[0] == os.getpid() and chain[1] == os.getppid()
    assert lineage(2**22 + 12345) == [2**22 + 12345], "a process gone: itself only"
