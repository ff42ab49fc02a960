"""whisperctl submit's decoding options: --prompt and --temperature parsed, a temperature outside 0..1
refused before anything is sent, and both handed to Client.submit."""

from __future__ import annotations

import argparse

import pytest

from whisperctl.cli import build_parser, cmd_submit
from whisperd import protocol as p


class RecordingClient:
    def __init__(self) -> None:
        self.options: dict[str, object] = {}

    def submit(self, paths: list[str], **options: object) -> list[p.JobView]:
        self.options = options
        return []


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", "talk.wav", *argv])


def test_prompt_and_temperature_go_to_the_submit() -> None:
    client = RecordingClient()
    assert cmd_submit(client, parse("--prompt", "Ana, Bob.", "--temperature", "0.3")) == 0  # type: ignore[arg-type]
    assert (client.options["prompt"], client.options["temperature"]) == ("Ana, Bob.", 0.3)
    cmd_submit(client, parse())  # type: ignore[arg-type]
    assert (client.options["prompt"], client.options["temperature"]) == (None, None), "the daemon's defaults"


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "warm"])
def test_a_temperature_outside_0_to_1_is_refused_as_bad_arguments(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--temperature", value)
    assert exited.value.code == 2 and "--temperature" in capsys.readouterr().err


def test_the_options_are_what_the_protocol_accepts() -> None:
    request = p.Submit(files=[p.SubmitFile(name="talk.wav", fd_index=0)], prompt="Ana.", temperature=1.0)
    decoded = p.decode_request(p.encode_line(request))
    assert isinstance(decoded, p.Submit) and (decoded.prompt, decoded.temperature) == ("Ana.", 1.0)
