"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, `initdb` and `pg_ctl` run as an
unprivileged user (PostgreSQL refuses to run as root; as root the tests create a system user for it), its
data and its Unix socket in a temporary directory, no TCP port, trust authentication for local connections
only. Removed on stop. Nothing of the machine's own PostgreSQL is touched."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

TEST_USER = "whisperd-pgtest"  # the system user the server runs as when the tests run as root


def server_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def why_not() -> str | None:
    """Why no cluster can be started here, or None."""
    if server_bin() is None:
        return "PostgreSQL's server is not installed (Debian package postgresql; `make test` installs it)"
    if os.geteuid() == 0 and shutil.which("useradd") is None:
        try:
            pwd.getpwnam(TEST_USER)
        except KeyError:
            return f"running as root without useradd: no unprivileged user {TEST_USER} to run PostgreSQL"
    return None


def _run_as() -> tuple[int, int] | None:
    """The uid and gid to run the server as: None when the tests are not root (they run it themselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True, capture_output=True,
        )  # fmt: skip
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_uid, entry.pw_gid


class Cluster:
    def __init__(self) -> None:
        reason = why_not()
        if reason is not None:
            raise RuntimeError(reason)
        self.bin = server_bin()
        self.root = Path(tempfile.mkdtemp(prefix="whisperd-pg-"))
        self.data, self.socket_dir = self.root / "data", self.root / "run"
        self._owner = _run_as()
        self.socket_dir.mkdir()
        if self._owner is not None:
            os.chown(self.root, *self._owner)
            os.chown(self.socket_dir, *self._owner)

    @property
    def conninfo(self) -> str:
        return f"host={self.socket_dir} port=5432 user=postgres dbname=postgres"

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port=5432"

    def _as_owner(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        assert self.bin is not None
        argv = [str(self.bin / argv[0]), *argv[1:]]
        owner = self._owner
        return subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=120,
            user=owner[0] if owner else None, group=owner[1] if owner else None,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        )  # fmt: skip

    def start(self) -> Cluster:
        self._as_owner(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._as_owner(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w",
                        "start"])  # fmt: skip
        return self

    def restart(self) -> None:
        """Stop the server at once (as a crash would) and start it again on the same data."""
        self._as_owner(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._as_owner(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w",
                        "start"])  # fmt: skip

    def down(self) -> None:
        """Stop the server at once (as a crash would), keeping its data for up()."""
        self._as_owner(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def up(self) -> None:
        """Start it again on the same data, after down()."""
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._as_owner(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w",
                        "start"])  # fmt: skip

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._as_owner(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])
            except subprocess.SubprocessError:
                time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
