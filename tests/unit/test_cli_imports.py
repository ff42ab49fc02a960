"""whisperctl starts for every command, so a command imports only what it uses: `ping` and `submit` need
argparse, the client and the protocol, not the table renderer, the TOML parser or anything of the daemon's.
Checked by module name in a fresh interpreter, not by time (the figure is `make bench`: bench/cli_start.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from whisperctl import cli, render

ALLOWED_OWN = {
    "whisperctl",
    "whisperctl.cli",
    "whisperctl.client",
    "whisperd",
    "whisperd.config",
    "whisperd.errors",
    "whisperd.jobs",
    "whisperd.protocol",
}
# Heavy or beside the point for a command that prints one line: each was imported by `ping` once, or
# belongs to the daemon.
NOT_NEEDED = {
    "tomllib",  # only to read a config file
    "shutil",  # argparse sizes its help with it; cli sizes it without
    "pwd",  # user names, for stats
    "asyncio",
    "uvloop",
    "sqlite3",
    "aiohttp",
    "prometheus_client",
    "numpy",
    "faster_whisper",
    "ctranslate2",
    "rich",  # the terminal views: top and the progress bars only
}

PROBE = """
import json, sys
from whisperctl import cli
status = cli.main(sys.argv[1:])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def modules_after(*argv: str) -> tuple[int, set[str]]:
    """The exit status of `whisperctl ARGV` run in-process in a fresh interpreter, and what it imported."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(done.stdout.splitlines()[-1])
    return report["status"], set(report["modules"])


def unneeded(modules: set[str]) -> set[str]:
    own = {m for m in modules if m.split(".")[0] in ("whisperctl", "whisperd")}
    return (own - ALLOWED_OWN) | {m for m in modules if m.split(".")[0] in NOT_NEEDED}


def test_ping_imports_only_what_it_uses(tmp_path: Path) -> None:
    # No daemon on that path: the command goes all the way to connect() and exits with "unreachable".
    status, modules = modules_after("--socket", str(tmp_path / "none.sock"), "ping")
    assert status == cli.EXIT_UNREACHABLE
    assert {"whisperctl.client", "whisperd.protocol", "msgspec"} <= modules
    assert unneeded(modules) == set()


def test_submit_without_wait_imports_only_what_it_uses(tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    status, modules = modules_after("--socket", str(tmp_path / "none.sock"), "submit", str(clip))
    assert status == cli.EXIT_UNREACHABLE
    assert unneeded(modules) == set()


def test_status_imports_no_terminal_views(tmp_path: Path) -> None:
    # status renders its table with whisperctl.render, which may load; rich and the views may not.
    status, modules = modules_after("--socket", str(tmp_path / "none.sock"), "status")
    assert status == cli.EXIT_UNREACHABLE
    assert not {m for m in modules if m.split(".")[0] == "rich" or m.startswith("whisperctl.top")}
    assert "whisperctl.progress_view" not in modules


def test_the_parser_offers_the_renderers_formats() -> None:
    assert cli.FORMATS == render.FORMATS
