"""NvmlProbe against a fake libnvidia-ml.so.1, loaded by the real pynvml through its normal dlopen.

The library path must be in place before pynvml loads it, so every probe runs in a subprocess with
LD_LIBRARY_PATH pointing at the fake (and nothing else) and FAKE_NVML_STATE naming its state file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fakenvml import build_fake_nvml, gcc_path, write_state  # noqa: E402
from whisperd.gpuprobe import GpuReading  # noqa: E402

pytestmark = pytest.mark.skipif(gcc_path() is None, reason="gcc is missing: cannot build the fake NVML")

# Runs in the subprocess. argv[1] is JSON: exclude (GPU indices), reads (how many read() calls;
# before each one after the first it waits for a line on stdin), starts (how many start() calls).
RUNNER = """
import json, logging, sys
import msgspec
from whisperd.gpuprobe import NvmlProbe

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
args = json.loads(sys.argv[1])
probe = NvmlProbe(exclude=frozenset(args["exclude"]))
started = [probe.start() for _ in range(args["starts"])][-1]
for i in range(args["reads"]):
    if i:
        sys.stdin.readline()
    result = {"started": started, "driver": probe.driver_version, "readings": probe.read()}
    sys.stdout.write(msgspec.json.encode(result).decode() + "\\n")
    sys.stdout.flush()
probe.close()
"""


class Result(msgspec.Struct):
    started: bool
    driver: str | None
    readings: list[GpuReading]


H200 = {
    "name": "NVIDIA-H200",
    "uuid": "GPU-0000",
    "total": 150_000_000_000,
    "used": 1_000_000_000,
    "util": 35,
    "mem_util": 10,
    "temp": 45,
    "power_mw": 120_000,
    "fail": 0,
}
L4 = {
    "name": "NVIDIA-L4",
    "uuid": "GPU-0001",
    "total": 24_000_000_000,
    "used": 6_000_000_000,
    "util": 80,
    "mem_util": 25,
    "temp": 61,
    "power_mw": 55_500,
    "fail": 0,
}


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml")).parent


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "nvml-state"


def _env(lib_dir: Path, state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(lib_dir)
    env["FAKE_NVML_STATE"] = str(state)
    env["PYTHONPATH"] = str(REPO)
    return env


def _cmd(exclude: list[int], reads: int, starts: int = 1) -> list[str]:
    args = {"exclude": exclude, "reads": reads, "starts": starts}
    return [sys.executable, "-c", RUNNER, json.dumps(args)]


def probe(
    lib_dir: Path, state: Path, exclude: list[int] | None = None, starts: int = 1
) -> tuple[Result, str]:
    """Start a probe in a subprocess, read once; the result and the subprocess's log (stderr)."""
    proc = subprocess.run(
        _cmd(exclude or [], reads=1, starts=starts),
        env=_env(lib_dir, state),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return msgspec.json.decode(proc.stdout, type=Result), proc.stderr


def _expected(index: int, gpu: dict[str, Any]) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=gpu["uuid"],
        name=gpu["name"],
        healthy=True,
        error=None,
        memory_total_bytes=gpu["total"],
        memory_used_bytes=gpu["used"],
        memory_free_bytes=gpu["total"] - gpu["used"],
        utilization_ratio=gpu["util"] / 100,
        memory_utilization_ratio=gpu["mem_util"] / 100,
        temperature_c=float(gpu["temp"]),
        power_w=gpu["power_mw"] / 1000,
    )


def test_two_gpus_read_exactly(lib_dir: Path, state: Path) -> None:
    write_state(state, [H200, L4], driver="550.54.15")
    result, _ = probe(lib_dir, state)
    assert result.started
    assert result.driver == "550.54.15"
    assert result.readings == [_expected(0, H200), _expected(1, L4)]
    first = result.readings[0]
    assert first.utilization_ratio == 0.35
    assert first.power_w == 120.0
    assert first.memory_free_bytes == 149_000_000_000


def test_lost_gpu_is_unhealthy_and_the_other_is_not(lib_dir: Path, state: Path) -> None:
    write_state(state, [H200, {**L4, "fail": 1}])
    result, _ = probe(lib_dir, state)
    healthy, lost = result.readings
    assert healthy == _expected(0, H200)
    assert lost.index == 1
    assert not lost.healthy
    assert lost.error == "GPU is lost"
    assert lost.uuid is None
    assert lost.memory_total_bytes is None


def test_unsupported_power_leaves_gpu_healthy(lib_dir: Path, state: Path) -> None:
    write_state(state, [{**H200, "power_mw": "na"}])
    result, _ = probe(lib_dir, state)
    (reading,) = result.readings
    assert reading.healthy
    assert reading.power_w is None
    assert reading.utilization_ratio == 0.35


def test_init_failure_means_no_gpus(lib_dir: Path, state: Path) -> None:
    write_state(state, [H200], init_fail=True)
    result, log = probe(lib_dir, state, starts=2)
    assert not result.started
    assert result.readings == []
    assert result.driver is None
    assert log.count("no NVML: running on CPU workers only") == 1
    assert "Driver Not Loaded" in log


def test_no_library_means_no_gpus(tmp_path: Path, state: Path) -> None:
    empty = tmp_path / "empty-lib-dir"
    empty.mkdir()
    check = "import ctypes, sys\ntry: ctypes.CDLL('libnvidia-ml.so.1')\nexcept OSError: sys.exit(1)"
    env = _env(empty, state)
    if subprocess.run([sys.executable, "-c", check], env=env, check=False).returncode == 0:
        pytest.skip("a real libnvidia-ml.so.1 is on the default library path")
    write_state(state, [H200])
    result, log = probe(empty, state)
    assert not result.started
    assert result.readings == []
    assert "no NVML: running on CPU workers only" in log


def test_device_count_failure_reads_nothing(lib_dir: Path, state: Path) -> None:
    write_state(state, [H200], count_fail=True)
    result, log = probe(lib_dir, state)
    assert result.started
    assert result.readings == []
    assert "WARNING whisperd.gpu NVML could not count GPUs" in log


def test_exclude_drops_gpu(lib_dir: Path, state: Path) -> None:
    write_state(state, [H200, L4, {**L4, "uuid": "GPU-0002"}])
    result, _ = probe(lib_dir, state, exclude=[1])
    assert [(r.index, r.uuid) for r in result.readings] == [(0, "GPU-0000"), (2, "GPU-0002")]


def test_state_rewritten_between_reads_in_one_process(lib_dir: Path, state: Path) -> None:
    write_state(state, [H200, L4])
    with subprocess.Popen(
        _cmd([], reads=2),
        env=_env(lib_dir, state),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            before = msgspec.json.decode(proc.stdout.readline(), type=Result)
            write_state(state, [{**H200, "used": 90_000_000_000, "util": 100}, {**L4, "fail": 1}])
            proc.stdin.write("go\n")
            proc.stdin.flush()
            after = msgspec.json.decode(proc.stdout.readline(), type=Result)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
    assert before.readings == [_expected(0, H200), _expected(1, L4)]
    changed, lost = after.readings
    assert changed.memory_used_bytes == 90_000_000_000
    assert changed.memory_free_bytes == 60_000_000_000
    assert changed.utilization_ratio == 1.0
    assert not lost.healthy
