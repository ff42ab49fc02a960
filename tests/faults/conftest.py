"""The fault-injection suite: kill -9 of the daemon, SIGKILL of its workers. It takes minutes, so `make test`
(pytest with no paths: testpaths) leaves it out and `make test-faults` runs it alone; naming tests/faults or a
file in it on the command line runs it too. Each test records its figures, printed at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

FAULTS = Path(__file__).parent.resolve()
FIGURES = pytest.StashKey[list[str]]()


def named(config: pytest.Config) -> bool:
    """tests/faults, or something in it, was named on the command line."""
    base = config.invocation_params.dir
    for arg in config.args:
        path = (base / arg.split("::")[0]).resolve()
        if path == FAULTS or FAULTS in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    return True if not named(config) else None


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> list[str]:
    """Lines a test reports (rounds survived, jobs, kills): shown in the run's summary, pass or fail."""
    lines = request.config.stash.setdefault(FIGURES, [])
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.write_sep("=", "fault injection figures")
        for line in lines:
            terminalreporter.write_line(line)
