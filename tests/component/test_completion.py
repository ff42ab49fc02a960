"""Shell completion: the shipped scripts are what `whisperctl completion` prints now; real bash and zsh,
with the script loaded, complete subcommands, options, choices, and job ids and model names asked of a real
daemon (tests/support/daemon.py) through `whisperctl __complete`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from whisperctl import completion
from whisperctl.cli import build_parser

COMPLETION = Path(__file__).resolve().parents[2] / "etc" / "completion"
SHIPPED = {"bash": COMPLETION / "whisperctl.bash", "zsh": COMPLETION / "_whisperctl"}
BIN = Path(sys.executable).parent
needs_whisperctl = pytest.mark.skipif(
    not (BIN / "whisperctl").exists(), reason="whisperctl is not installed in the venv: run `make test`"
)
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
needs_zsh = pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is needed: `make test` installs it")


def env_for(daemon: DaemonProcess | None, tmp_path: Path) -> dict[str, str]:
    """whisperctl on PATH (the venv's), the daemon's socket (or one nobody listens on), a HOME of its own so
    that no shell reads or writes a real user's files."""
    env = dict(daemon.env) if daemon is not None else {**os.environ, "WHISPERD_SOCKET": str(tmp_path / "no")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", HOME=str(tmp_path), ZDOTDIR=str(tmp_path))
    return env


def bash_complete(words: list[str], env: dict[str, str]) -> list[str]:
    """What bash offers for the last of words, the shipped script loaded, as readline would ask it."""
    body = (
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; '
        'COMP_POINT=${#COMP_LINE}; _shtab_whisperctl; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", body, "bash", str(SHIPPED["bash"]), *words],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [line for line in done.stdout.splitlines() if line]


def submit_three(daemon: DaemonProcess, tmp_path: Path) -> list[int]:
    """Three jobs on a daemon without workers (they stay PENDING); the second one cancelled."""
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"RIFF not really audio: an idle daemon never decodes it")
    ids = [job.id for job in daemon.client.submit([str(audio)] * 3)]
    daemon.client.cancel([ids[1]])
    return ids


def test_the_shipped_scripts_are_what_whisperctl_prints_now() -> None:
    for shell, path in SHIPPED.items():
        assert path.read_text() == completion.script(build_parser(), shell), (
            f"{path} is stale: run `make completion` (whisperctl's commands or options changed)"
        )


@needs_whisperctl
def test_completion_prints_the_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "whisperctl"), "completion", "zsh"], env=env_for(None, tmp_path),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == SHIPPED["zsh"].read_text()


@needs_bash
@needs_whisperctl
def test_bash_completes_subcommands_options_and_choices(tmp_path: Path) -> None:
    env = env_for(None, tmp_path)
    assert bash_complete(["whisperctl", "w"], env) == ["wait", "watch"]
    assert set(bash_complete(["whisperctl", ""], env)) >= {"submit", "status", "cancel", "completion"}
    assert "--word-timestamps" in bash_complete(["whisperctl", "submit", "--"], env)
    assert bash_complete(["whisperctl", "result", "7", "--format", "s"], env) == ["srt"]
    assert bash_complete(["whisperctl", "status", "--state", "P"], env) == ["PENDING", "PROCESSING"]
    assert bash_complete(["whisperctl", "completion", ""], env) == ["bash", "zsh"]


@needs_bash
@needs_whisperctl
def test_bash_completes_job_ids_and_models_from_the_daemon(
    idle_daemon: DaemonProcess, tmp_path: Path
) -> None:
    first, cancelled, third = submit_three(idle_daemon, tmp_path)
    env = env_for(idle_daemon, tmp_path)
    live = sorted(map(str, (first, third)))
    assert sorted(bash_complete(["whisperctl", "wait", ""], env)) == live
    assert sorted(bash_complete(["whisperctl", "cancel", str(first), ""], env)) == live  # root: any job
    assert sorted(bash_complete(["whisperctl", "status", ""], env)) == sorted(
        map(str, (first, cancelled, third))
    )
    assert bash_complete(["whisperctl", "result", ""], env) == [], "none COMPLETED"
    assert bash_complete(["whisperctl", "submit", "--model", ""], env) == ["tiny.en"]
    assert bash_complete(["whisperctl", "submit", "--model", "x"], env) == []

    # --socket on the line wins over the environment
    elsewhere = {**env, "WHISPERD_SOCKET": str(tmp_path / "nobody-here.sock")}
    assert bash_complete(["whisperctl", "wait", ""], elsewhere) == []
    line = ["whisperctl", "--socket", str(idle_daemon.socket), "wait", ""]
    assert sorted(bash_complete(line, elsewhere)) == live


@needs_whisperctl
def test_the_helper_is_silent_when_the_daemon_is_down_or_the_kind_unknown(tmp_path: Path) -> None:
    env = env_for(None, tmp_path)
    for kind in ("live-jobs", "models", "no-such-kind"):
        done = subprocess.run(
            [str(BIN / "whisperctl"), "__complete", kind], env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout, done.stderr) == (1, "", "")


# ---- zsh ---------------------------------------------------------------------------------------------

# Types a line and a TAB into an interactive zsh on a pseudo-terminal (zsh/zpty) that loaded the script
# from $fpath through compinit; compadd is wrapped to write the matches it adds to a file, and "--done--"
# follows once the completion has run.
DRIVE = r"""
zmodload zsh/zpty || exit 3
dir=$1 out=$2 line=$3
zpty z zsh -f -i
zpty -w z "PS1='' RPROMPT=''; fpath=(${(q)dir} \$fpath); autoload -Uz compinit; compinit -D -u"
zpty -w z "compadd() {
  if [[ \${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd \"\$@\"; return; fi
  local -a __m; builtin compadd -A __m \"\$@\"; print -rl -- \$__m >> ${(q)out}; builtin compadd \"\$@\"
}"
zpty -w z "_test_done() { print -r -- --done-- >> ${(q)out} }; comppostfuncs=(_test_done)"
zpty -w z "print -r -- --ready-- >> ${(q)out}"
for i in {1..400}; do [[ -s $out ]] && break; sleep 0.05; done
: > $out
zpty -w -n z "$line"$'\t'
for i in {1..400}; do grep -q -- --done-- $out 2>/dev/null && break; sleep 0.05; done
zpty -d z
cat $out
"""


def zsh_complete(line: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    fpath = tmp_path / "site-functions"
    fpath.mkdir(exist_ok=True)
    shutil.copy(SHIPPED["zsh"], fpath / "_whisperctl")
    out = tmp_path / "matches"
    out.unlink(missing_ok=True)
    drive = tmp_path / "drive.zsh"
    drive.write_text(DRIVE)
    done = subprocess.run(
        ["zsh", "-f", str(drive), str(fpath), str(out), line], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1:] == ["--done--"], f"the completion did not run: {done.stdout}"
    return lines[:-1]


@needs_zsh
def test_zsh_loads_the_script_by_source_and_from_fpath_without_errors(tmp_path: Path) -> None:
    env = env_for(None, tmp_path)
    for load in (f"source {SHIPPED['zsh']}", f"fpath=({COMPLETION} $fpath); compinit -D -u"):
        line = f"autoload -Uz compinit; compinit -D -u; {load}; print -r -- $_comps[whisperctl]"
        done = subprocess.run(
            ["zsh", "-f", "-c", line],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert done.stdout.strip() in ("_shtab_whisperctl", "_whisperctl"), done.stdout


@needs_zsh
@needs_whisperctl
def test_zsh_completes_subcommands_options_and_job_ids(idle_daemon: DaemonProcess, tmp_path: Path) -> None:
    first, _cancelled, third = submit_three(idle_daemon, tmp_path)
    env = env_for(idle_daemon, tmp_path)
    assert zsh_complete("whisperctl w", env, tmp_path) == ["wait", "watch"]
    assert "--word-timestamps" in zsh_complete("whisperctl submit --w", env, tmp_path)
    assert sorted(zsh_complete("whisperctl wait ", env, tmp_path)) == sorted(map(str, (first, third)))
    assert zsh_complete("whisperctl submit --model ", env, tmp_path) == ["tiny.en"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_puts_the_scripts_and_the_dashboard_under_share(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["make", "-C", str(root), "install-share", f"DESTDIR={tmp_path}", "PREFIX=/usr"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    share = tmp_path / "usr" / "share"
    assert (share / "bash-completion" / "completions" / "whisperctl").read_text() == SHIPPED[
        "bash"
    ].read_text()
    assert (share / "zsh" / "site-functions" / "_whisperctl").read_text() == SHIPPED["zsh"].read_text()
    dashboard = root / "etc" / "grafana" / "whisperd.json"
    assert (share / "whisperd" / "grafana" / "whisperd.json").read_bytes() == dashboard.read_bytes()
