"""docs/client.md's complete example, run as written against a real daemon (faster-whisper tiny.en on speech
made with espeak-ng), so the documented API cannot drift from the code: it type-checks under mypy --strict,
transcribes and writes SubRip files a real parser reads, explains a refused model by its error code, says
so when the daemon is not there, and cancels its job on Ctrl-C."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import srt

from tests.support.daemon import DaemonProcess
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def example() -> str:
    text = (ROOT / "docs" / "client.md").read_text()
    match = re.search(r"\n## A complete example\n.*?```python\n(.*?)```", text, re.S)
    assert match, "docs/client.md has a python block under 'A complete example'"
    return match.group(1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon of its own with one CPU worker: the example's jobs run one after the other."""
    started = DaemonProcess(tmp_path_factory.mktemp("client-doc"), {"workers": {"cpu_workers": 1}}).start()
    yield started
    started.stop()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "transcribe.py"
    path.write_text(example())
    return path


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=script.parent, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_the_example_type_checks_strictly(script: Path, tmp_path: Path) -> None:
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mypy is not installed in the venv: run `make test`")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mypy"), "--strict", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "mypy-cache"), str(script)],
        env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_example_transcribes_and_writes_subtitles(
    daemon: DaemonProcess, script: Path, speech: dict[str, Path], tmp_path: Path
) -> None:
    clips = [shutil.copy(speech[name], tmp_path / f"{name}.wav") for name in ("fox", "weather")]
    done = run(script, daemon.env, "--language", "en", *map(str, clips))
    assert done.returncode == 0, done.stderr
    assert "COMPLETED 100%" in done.stderr, "progress followed through watch()"
    for clip, spoken in zip(clips, ({"fox", "lazy", "dog"}, {"weather", "sunny", "breeze"}), strict=True):
        subtitles = list(srt.parse(Path(clip).with_suffix(".srt").read_text()))
        assert subtitles and subtitles[0].start.total_seconds() >= 0
        heard = set(re.findall(r"[a-z]+", " ".join(s.content for s in subtitles).lower()))
        assert len(spoken & heard) >= 2, subtitles
        assert f"{Path(clip).with_suffix('.srt')}: " in done.stdout
    jobs = daemon.client.status(limit=2)
    assert {(job.state, job.language, job.word_timestamps) for job in jobs} == {
        (JobState.COMPLETED, "en", True)
    }


def test_the_example_explains_errors_by_their_code(
    daemon: DaemonProcess, script: Path, speech: dict[str, Path], tmp_path: Path
) -> None:
    refused = run(script, daemon.env, "--model", "no-such-model", str(speech["fox"]))
    assert refused.returncode == 2
    assert "no model 'no-such-model'; this daemon serves tiny.en" in refused.stderr
    assert "Traceback" not in refused.stderr

    nobody = {**daemon.env, "WHISPERD_SOCKET": str(tmp_path / "nobody.sock")}
    down = run(script, nobody, str(speech["fox"]))
    assert (down.returncode, "Traceback" in down.stderr) == (3, False), down.stderr
    assert "whisperd is not running here" in down.stderr

    missing = run(script, daemon.env, str(tmp_path / "missing.wav"))
    assert (missing.returncode, missing.stderr.strip()) == (
        2,
        f"bad_request: no such file: {tmp_path}/missing.wav",
    )


def test_ctrl_c_cancels_the_running_job(daemon: DaemonProcess, script: Path, speech: dict[str, Path]) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(script), str(speech["long"])], env=daemon.env, cwd=script.parent,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "PROCESSING" not in seen:  # the script is in its watch() loop, the job on a worker
            assert time.monotonic() < deadline, f"no progress line: {seen}"
            if select.select([proc.stderr], [], [], 1.0)[0]:
                line = proc.stderr.readline()
                assert line, f"the script ended early: {seen}"
                seen += line
        [job_id] = {int(n) for n in re.findall(r"job (\d+): PROCESSING", seen)}
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert f"cancelled jobs [{job_id}]" in err
        assert daemon.job(job_id).state is JobState.CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
