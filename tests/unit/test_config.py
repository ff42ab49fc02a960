"""The configuration: defaults, strict decoding, and the environment overrides."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from whisperd.config import BUNDLED_MODEL, Config, load_config, parse_config
from whisperd.errors import ConfigError

GIB = 1024**3


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("scheduler", "schedule_interval_s", 2.0),
        ("scheduler", "gpu_monitor_interval_s", 5.0),
        ("scheduler", "performance_monitor_interval_s", 30.0),
        ("scheduler", "batch_timeout_s", 5.0),
        ("scheduler", "min_batch_size", 1),
        ("scheduler", "max_batch_size", 3),
        ("scheduler", "memory_safety_margin", 0.10),
        ("scheduler", "min_free_memory_bytes", GIB),
        ("scheduler", "max_retries", 3),
        ("scheduler", "retry_backoff_s", 1.0),
        ("scheduler", "retry_backoff_max_s", 60.0),
        ("transcribe", "default_model", "tiny.en"),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("make", [Config, lambda: parse_config("")], ids=["Config()", "parse-empty"])
def test_defaults(section: str, key: str, expected: object, make: Callable[[], Config]) -> None:
    config = make()
    assert getattr(getattr(config, section), key) == expected


def test_default_models_map_the_bundled_model() -> None:
    assert Config().models == {"tiny.en": BUNDLED_MODEL}


def test_parse_reads_values() -> None:
    config = parse_config(
        """
        [scheduler]
        max_batch_size = 8
        memory_safety_margin = 0.2
        [models]
        "large-v3" = "/opt/models/large-v3"
        [transcribe]
        default_model = "large-v3"
        """
    )
    assert config.scheduler.max_batch_size == 8
    assert config.scheduler.memory_safety_margin == 0.2
    assert config.scheduler.min_batch_size == 1
    assert config.models == {"large-v3": "/opt/models/large-v3"}
    assert config.transcribe.default_model == "large-v3"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[daemon]\nbogus = 1\n", ["bogus", "$.daemon"]),
        ("[scheduler]\nbatch_size = 2\n", ["batch_size", "$.scheduler"]),
        ("bogus = 1\n", ["bogus"]),
        ("[nosuchsection]\n", ["nosuchsection"]),
        ("[scheduler]\nmax_batch_size = 0\n", ["max_batch_size"]),
        ("[scheduler]\nmin_batch_size = 0\n", ["min_batch_size"]),
        ("[scheduler]\nschedule_interval_s = 0\n", ["schedule_interval_s"]),
        ("[scheduler]\nmemory_safety_margin = 1.0\n", ["memory_safety_margin"]),
        ("[scheduler]\nmax_retries = -1\n", ["max_retries"]),
        ('[scheduler]\nmax_batch_size = "3"\n', ["max_batch_size"]),
        ('[daemon]\nlog_level = "loud"\n', ["log_level"]),
        ("[scheduler]\nmin_batch_size = 4\nmax_batch_size = 3\n", ["min_batch_size", "max_batch_size"]),
        ('[transcribe]\ndefault_model = "large"\n', ["large", "models"]),
        ("[daemon\n", ["not valid TOML"]),
        ("x = \n", ["not valid TOML"]),
    ],
    ids=[
        "unknown-key-in-section",
        "unknown-scheduler-key",
        "unknown-top-level-key",
        "unknown-section",
        "max-batch-0",
        "min-batch-0",
        "interval-0",
        "margin-1",
        "negative-retries",
        "wrong-type",
        "bad-literal",
        "min-over-max-batch",
        "default-model-not-in-models",
        "toml-unclosed-table",
        "toml-missing-value",
    ],
)
def test_parse_refuses(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/whisperd.toml")
    assert info.value.message.startswith("/etc/whisperd.toml: ")
    for fragment in fragments:
        assert fragment in info.value.message
    assert info.value.code == "bad_config"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.delenv("WHISPERD_SOCKET", raising=False)
    monkeypatch.delenv("WHISPERD_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return monkeypatch


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "whisperd.toml"
    path.write_text(text)
    return path


CONFIGURED = '[daemon]\nsocket_path = "/cfg/sock"\nstate_dir = "/cfg/state"\n'


@pytest.mark.parametrize(
    ("text", "env", "socket", "state"),
    [
        (CONFIGURED, {}, "/cfg/sock", "/cfg/state"),
        (CONFIGURED, {"WHISPERD_SOCKET": "/env/sock"}, "/env/sock", "/cfg/state"),
        (CONFIGURED, {"WHISPERD_STATE_DIR": "/env/state"}, "/cfg/sock", "/env/state"),
        (
            CONFIGURED,
            {"WHISPERD_SOCKET": "/env/sock", "WHISPERD_STATE_DIR": "/env/state"},
            "/env/sock",
            "/env/state",
        ),
        ("", {"WHISPERD_SOCKET": "/env/sock", "WHISPERD_STATE_DIR": "/env/state"}, "/env/sock", "/env/state"),
        (
            None,
            {"WHISPERD_SOCKET": "/env/sock", "WHISPERD_STATE_DIR": "/env/state"},
            "/env/sock",
            "/env/state",
        ),
        (CONFIGURED, {"WHISPERD_SOCKET": "", "WHISPERD_STATE_DIR": ""}, "/cfg/sock", "/cfg/state"),
    ],
    ids=[
        "file-only",
        "env-socket",
        "env-state-dir",
        "env-both",
        "empty-file-env-both",
        "no-file-env-both",
        "empty-env-ignored",
    ],
)
def test_load_config_environment_overrides(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    text: str | None,
    env: dict[str, str],
    socket: str,
    state: str,
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    path = None if text is None else _write(tmp_path, text)
    config = load_config(path)
    assert config.daemon.socket_path == socket
    assert config.daemon.state_dir == state


def test_load_config_keeps_file_values(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[scheduler]\nmax_retries = 7\n"))
    assert config.scheduler.max_retries == 7


def test_load_config_missing_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in info.value.message


def test_load_config_bad_file_names_the_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _write(tmp_path, "[daemon]\nbogus = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.message.startswith(f"{path}: ")
    assert "bogus" in info.value.message


@pytest.mark.parametrize(
    ("toml", "applied", "refused"),
    [
        ("", [], []),
        ("[scheduler]\nmax_batch_size = 2\n", ["scheduler.max_batch_size"], []),
        (
            "[workers]\ncpu_workers = 4\ncancel_grace_s = 1.0\n",
            ["workers.cancel_grace_s"],
            ["workers.cpu_workers"],
        ),
        ('[metrics]\nlisten = "0.0.0.0:1"\n', [], ["metrics.listen"]),
        ("[gpu]\nexclude = [1]\n", [], ["gpu.exclude"]),
        ('[models]\n"tiny.en" = "bundled:tiny.en"\nbig = "large-v3"\n', ["models.big"], []),
        ("[scheduler]\ngpu_monitor_interval_s = 1.0\n", [], ["scheduler.gpu_monitor_interval_s"]),
    ],
    ids=["nothing", "batch-size", "workers-mixed", "metrics", "gpu", "new-model", "monitor-period"],
)
def test_plan_reload(toml: str, applied: list[str], refused: list[str]) -> None:
    from whisperd.config import plan_reload

    running = Config()
    merged, got_applied, got_refused = plan_reload(running, parse_config(toml))
    assert (got_applied, got_refused) == (applied, refused)
    for key in refused:  # a refused key keeps its running value
        section, name = key.split(".")
        assert getattr(getattr(merged, section), name) == getattr(getattr(running, section), name)
    expected = parse_config(toml)
    for key in applied:
        section, _, name = key.partition(".")
        if section == "models":
            assert merged.models[name] == expected.models[name]
        else:
            assert getattr(getattr(merged, section), name) == getattr(getattr(expected, section), name)
