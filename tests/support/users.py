"""Acting as another Unix user from a test that runs as root: fork, drop to the user, run, report back."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from whisperctl.client import RemoteError


def as_user(
    uid: int, action: Callable[[], object], gid: int | None = None, groups: Sequence[int] = ()
) -> Any:
    """Run action in a forked child that has dropped to uid (and gid, default uid; `groups` as its
    supplementary groups). Returns {"ok": result}, {"error": protocol code}, {"os_error": errno name} or
    {"unexpected": repr}. The child does not exec, so the test's imports (and the venv behind /root) stay
    usable."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.setgroups(list(groups))
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            try:
                result: Any = {"ok": action()}
            except RemoteError as exc:
                result = {"error": exc.code}
            except OSError as exc:
                result = {"os_error": errno.errorcode.get(exc.errno or 0, str(exc))}
            except BaseException as exc:
                result = {"unexpected": repr(exc)}
            os.write(write_end, json.dumps(result, default=str).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)
