from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakenvml import build_fake_nvml, gcc_path
from tests.support import audio
from tests.support.daemon import DaemonProcess
from tests.support.gpus import Gpus, start_gpu_daemon
from tests.support.postgres import Cluster
from tests.support.postgres import why_not as pg_why_not
from tests.support.system_state import SYSTEM_PATHS, Snapshot, changed, snapshot

SYSTEM_BEFORE = pytest.StashKey[Snapshot]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[SYSTEM_BEFORE] = snapshot(SYSTEM_PATHS)


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown: every daemon has stopped by then
def pytest_sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    """Tests must never touch the machine's own whisperd state: fail the run if they did."""
    before = session.config.stash.get(SYSTEM_BEFORE, None)
    if before is None:
        return
    touched = changed(before, snapshot(SYSTEM_PATHS))
    if not touched:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"the test run created, changed or removed {len(touched)} path(s) of the system's whisperd:"]
    lines += [f"  {path}" for path in touched]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("!", "system whisperd state touched", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def no_daemon_left_behind() -> Iterator[None]:
    yield
    for daemon in DaemonProcess.started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(30)
        shutil.rmtree(daemon.socket.parent, ignore_errors=True)  # the short socket dir under /tmp


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short clips of real speech, one per sentence in audio.SENTENCES, plus 'medium' (about 23 s) and
    'long' (about 3 minutes: seconds of work even for tiny.en, so a test can act while it runs)."""
    if not audio.have_tools():
        pytest.fail("espeak-ng and sox are needed: run `make test`, which installs them")
    folder = tmp_path_factory.mktemp("speech")
    clips = {name: audio.speak(text, folder / f"{name}.wav") for name, text in audio.SENTENCES.items()}
    clips["medium"] = audio.long_speech(folder / "medium.wav", repeats=1)
    clips["long"] = audio.long_speech(folder / "long.wav", repeats=8)
    return clips


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def shared_daemon(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[DaemonProcess]:
    """One daemon with two CPU workers for the end-to-end cases that leave it healthy: on the embedded
    store, and again as one host of a shared PostgreSQL store (every case must pass on both)."""
    config: dict[str, dict[str, object]] = {
        "daemon": {"socket_mode": 0o666},
        "scheduler": {"retry_backoff_s": 0.2},
        "workers": {"cpu_workers": 2},
    }
    if request.param == "postgresql":
        cluster: Cluster = request.getfixturevalue("postgres")
        config["store"] = {"url": cluster.create_database("shared_daemon"), "host_id": "e2e"}
    daemon = DaemonProcess(tmp_path_factory.mktemp(f"shared-daemon-{request.param}"), config).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def idle_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon with no workers: every job stays PENDING, which makes queue behaviour deterministic."""
    daemon = DaemonProcess(
        tmp_path / "state",
        {
            "daemon": {"socket_mode": 0o666, "max_queued_jobs": 5},
            "workers": {"cpu_workers": 0},
            "scheduler": {"performance_monitor_interval_s": 0.5},
        },
    ).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def gpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpus]:
    """One daemon that sees two fake GPUs through the real pynvml; each test sets the figures it needs."""
    if gcc_path() is None:
        pytest.skip("gcc is needed to build the fake NVML library")
    folder = tmp_path_factory.mktemp("fakenvml-gpus")
    fake = start_gpu_daemon(folder, build_fake_nvml(folder / "lib"))
    yield fake
    fake.daemon.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (tests/support/postgres.py), shared by the session; each test makes
    its own database in it."""
    reason = pg_why_not()
    if reason is not None:
        pytest.skip(reason)
    cluster = Cluster().start()
    yield cluster
    cluster.stop()
