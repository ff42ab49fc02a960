"""For a machine with NVIDIA GPUs: whisperd's NVML readings beside nvidia-smi's, then the CUDA path.

    .venv/bin/python bench/gpu_check.py   # NVML against nvidia-smi, then bench/throughput.py --device cuda

Exits non-zero when a figure disagrees beyond what two reads a moment apart can explain.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from whisperd.gpuprobe import NvmlProbe  # noqa: E402

MIB = 1024**2
QUERY = "index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu,power.draw"


def nvidia_smi() -> dict[int, list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [[cell.strip() for cell in line.split(",")] for line in out.stdout.strip().splitlines()]
    return {int(row[0]): row for row in rows}


def compare() -> bool:
    probe = NvmlProbe()
    if not probe.start():
        print("NVML did not start: no GPU check possible")
        return False
    readings, smi = probe.read(), nvidia_smi()
    print(f"driver {probe.driver_version}; {len(readings)} GPUs")
    ok = True
    for r in readings:
        row = smi[r.index]
        na = row[8] in ("[N/A]", "N/A")
        pairs = {
            "uuid": (r.uuid, row[1]),
            "name": (r.name, row[2]),
            "memory.total MiB": ((r.memory_total_bytes or 0) // MIB, int(row[3])),
            "memory.used MiB": ((r.memory_used_bytes or 0) // MIB, int(row[4])),
            "utilization %": (round(100 * (r.utilization_ratio or 0)), int(row[6])),
            "temperature C": (r.temperature_c, float(row[7])),
            "power W": (r.power_w, None if na else float(row[8])),
        }
        print(f"GPU {r.index} healthy={r.healthy}")
        for key, (value, other) in pairs.items():
            close = value == other
            if isinstance(value, int | float) and isinstance(other, int | float):
                tolerance = {"memory.used MiB": 256, "utilization %": 30, "temperature C": 2, "power W": 40}
                close = abs(value - other) <= tolerance.get(key, 1)
            ok &= close
            verdict = "ok" if close else "DIFFERS"
            print(f"  {key:18} whisperd {value!s:>40}   nvidia-smi {other!s:>40}   {verdict}")
    probe.close()
    return ok


def main() -> int:
    ok = compare()
    bench = subprocess.run(
        [sys.executable, str(REPO / "bench" / "throughput.py"), "--device", "cuda", *sys.argv[1:]]
    )
    return 0 if ok and bench.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
