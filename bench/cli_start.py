"""Wall time of `whisperctl ping` as a whole command (process start to exit), against a daemon with no
workers, next to a bare `python -c pass`; and where its import time goes (`python -X importtime`).

    .venv/bin/python bench/cli_start.py --runs 20

Goal (issue 10): `whisperctl ping` <= 40 ms. Each command runs --runs times after one warm-up run; the
figures are medians. The import breakdown lists the modules with the largest cumulative import time, as
`python -X importtime -m whisperctl ping` reports them (one run, so noisy: read it for where, not how much).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.daemon import DaemonProcess  # noqa: E402

PYTHON = sys.executable
SCRIPT = str(Path(PYTHON).with_name("whisperctl"))  # the console script pip generated


def wall_ms(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    subprocess.run(argv, env=env, check=True, capture_output=True)  # warm the page cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def import_breakdown(env: dict[str, str], top: int) -> list[tuple[str, float, float]]:
    """(module, self ms, cumulative ms) of the `top` slowest imports of one `whisperctl ping`."""
    err = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "whisperctl", "ping"], env=env, check=True, capture_output=True
    ).stderr.decode()
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        rows.append((name.rstrip(), int(own) / 1000, int(cumulative) / 1000))
    return sorted(rows, key=lambda row: row[2], reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=25, help="how many imports the breakdown lists")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    commands = {
        "python -c pass": [PYTHON, "-c", "pass"],
        "whisperctl ping": [SCRIPT, "ping"],
        "python -m whisperctl ping": [PYTHON, "-m", "whisperctl", "ping"],
        "whisperctl --help": [SCRIPT, "--help"],
    }
    with tempfile.TemporaryDirectory(prefix="whisperd-cli-") as tmp:
        daemon = DaemonProcess(Path(tmp) / "state", {"workers": {"cpu_workers": 0}})
        daemon.start()
        try:
            # Bytecode as an installed package has it (pip compiles on install): the warm-up run writes it.
            env = {k: v for k, v in daemon.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            medians = {
                name: statistics.median(wall_ms(argv, env, args.runs)) for name, argv in commands.items()
            }
            imports = import_breakdown(env, args.top)
        finally:
            daemon.stop()
    report = {"runs": args.runs, "median_ms": medians, "imports_ms": imports, "cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("cli-start-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    for name, ms in medians.items():
        print(f"{name:<28} {ms:6.1f} ms  (median of {args.runs})")
    print(f"goal: whisperctl ping <= 40 ms; now {medians['whisperctl ping']:.1f} ms")
    print("\nslowest imports of one `whisperctl ping` (cumulative / self, ms):")
    for name, own, cumulative in imports:
        print(f"  {cumulative:7.2f} {own:7.2f}  {name}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
