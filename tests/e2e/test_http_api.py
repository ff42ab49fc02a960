"""The HTTP API end to end: a real daemon with its HTTP server on a free loopback port, faster-whisper's
tiny.en on two CPU workers, spoken clips; the real `openai` SDK and `curl` as clients, subtitles read back by
real parsers (`srt`, `webvtt-py`), jobs checked through the control socket."""

from __future__ import annotations

import http.client
import io
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
import srt  # type: ignore[import-untyped]
import webvtt
from openai.types.audio import TranscriptionVerbose

from tests.support import audio
from tests.support.daemon import DaemonProcess, free_port, scrape
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
MAX_UPLOAD_BYTES = 8 * MIB  # the long clip (about 6 MB) is under it: only its stated duration refuses it
MAX_DURATION_S = 120.0  # the long clip lasts about 3 minutes, medium about 23 s
NOBODY_UID = 65534


@dataclass
class Api:
    daemon: DaemonProcess
    port: int
    token: str  # root's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def openai(self, token: str | None = None) -> openai.OpenAI:
        """The SDK's client with this token (root's by default); no retries: a refused request must be
        seen as refused, not sent again."""
        key = token or self.token
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(
                base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120
            )
        return self.clients[key]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.daemon.stop()
        assert "Traceback" not in self.daemon.log()

    def spool(self) -> set[str]:
        return set(os.listdir(self.daemon.state_dir / "spool"))


@dataclass
class Stranger:
    name: str
    uid: int
    token: str


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    port = free_port()
    config: dict[str, dict[str, Any]] = {
        "daemon": {"socket_mode": 0o666},
        "workers": {"cpu_workers": 2},
        # Sequential: segments come as they are decoded, several for a clip of 23 s (batched mode makes a
        # window of up to 30 s one segment).
        "transcribe": {"max_audio_duration_s": MAX_DURATION_S, "mode": "sequential"},
        "http": {"max_upload_bytes": MAX_UPLOAD_BYTES},
    }
    daemon = DaemonProcess(
        tmp_path_factory.mktemp("http-api") / "state", config, env={"WHISPERD_HTTP_ADDR": f"127.0.0.1:{port}"}
    ).start()
    made = daemon.client.token_create("root", comment="e2e")
    api = Api(daemon, port, made.token)
    yield api
    api.close()


@pytest.fixture(scope="module")
def stranger(api: Api) -> Iterator[Stranger]:
    """A throwaway Unix user with a token of its own: not root, not the daemon's user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel to create a second Unix user")
    name = f"whisperd-http-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        made = api.daemon.client.token_create(name)
        assert made.info.uid == pwd.getpwnam(name).pw_uid
        yield Stranger(name, made.info.uid, made.token)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def longer(speech: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 92 s of speech (medium four times, under the duration limit): several seconds of work, so a
    test can act while it runs."""
    path = tmp_path_factory.mktemp("http-clips") / "longer.wav"
    subprocess.run(["sox", *[str(speech["medium"])] * 4, str(path)], check=True, timeout=60)
    return path


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 3)


def vtt_seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    return round(int(hours) * 3600 + int(minutes) * 60 + float(rest), 3)


def check_cues(cues: list[tuple[float, float, str]], duration_s: float, text: str) -> None:
    """Subtitles as parsed: times in order and within the audio, their words the transcript's."""
    assert cues, "at least one cue"
    previous_end = 0.0
    for start, end, _ in cues:
        assert 0.0 <= start <= end <= duration_s + 0.5
        assert start >= previous_end - 0.01, "cues in order, not overlapping"
        previous_end = end
    assert words(" ".join(cue for _, _, cue in cues)) == words(text)


def srt_cues(body: str) -> list[tuple[float, float, str]]:
    return [(seconds(s.start), seconds(s.end), s.content) for s in srt.parse(body)]


def vtt_cues(body: str) -> list[tuple[float, float, str]]:
    captions = webvtt.from_buffer(io.StringIO(body))
    return [(vtt_seconds(c.start), vtt_seconds(c.end), c.text) for c in captions.captions]


def curl(*args: str, token: str | None = None, timeout_s: float = 180) -> tuple[int, dict[str, str], bytes]:
    """curl's answer: status, headers (lowercase names), body."""
    command = ["curl", "-sS", "-i", "--max-time", str(timeout_s)]
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run([*command, *args], capture_output=True, check=True, timeout=timeout_s + 30).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # curl's Expect: 100-continue for a large upload
        head, _, body = body.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split()[1]), headers, body


def sse(body: bytes) -> list[tuple[str | None, Any]]:
    """(event name, data) of each server-sent event (comments skipped)."""
    events = []
    for block in body.decode().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
        if data is not None:
            events.append((name, data))
    return events


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    return body


# ---- OpenAI's routes, through the openai SDK ---------------------------------------------------------


def test_every_response_format_of_a_transcription(api: Api, speech: dict[str, Path]) -> None:
    client = api.openai()
    clip = speech["medium"]
    duration_s = audio.duration_s(clip)

    def transcribe(response_format: Literal["json", "text", "srt", "vtt", "verbose_json"]) -> Any:
        with open(clip, "rb") as file:
            return client.audio.transcriptions.create(
                file=file, model="whisper-1", response_format=response_format
            )

    text = transcribe("json").text
    assert {"quarterly", "meeting", "budget", "office"} <= set(words(text)), text
    plain = transcribe("text")
    assert isinstance(plain, str) and words(plain) == words(text)

    cues = srt_cues(transcribe("srt"))
    check_cues(cues, duration_s, text)
    assert len(cues) > 1, "a clip of 23 s is several segments"
    assert cues == vtt_cues(transcribe("vtt")), "the same cues in both formats"

    verbose = transcribe("verbose_json")
    assert isinstance(verbose, TranscriptionVerbose)
    assert verbose.language == "english" and verbose.duration == pytest.approx(duration_s, abs=0.1)
    assert words(verbose.text) == words(text) and verbose.words is None
    assert verbose.segments is not None
    times = [t for s in verbose.segments for t in (s.start, s.end)]
    assert times == pytest.approx([t for start, end, _ in cues for t in (start, end)], abs=1e-3)


def test_verbose_json_with_word_and_segment_timestamps(api: Api, speech: dict[str, Path]) -> None:
    client = api.openai()
    duration_s = audio.duration_s(speech["fox"])
    with open(speech["fox"], "rb") as file:
        only_words = client.audio.transcriptions.create(
            file=file, model="whisper-1", response_format="verbose_json", timestamp_granularities=["word"]
        )
    assert isinstance(only_words, TranscriptionVerbose) and only_words.segments is None
    assert only_words.words, "word timestamps were asked for"
    assert [w.word for w in only_words.words] == only_words.text.split()
    starts = [w.start for w in only_words.words]
    assert starts == sorted(starts) and all(
        0 <= w.start <= w.end <= duration_s + 0.5 for w in only_words.words
    )

    with open(speech["fox"], "rb") as file:
        both = client.audio.transcriptions.create(
            file=file, model="tiny.en", response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )  # fmt: skip
    assert both.segments and both.words and words(both.text) == words(only_words.text)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations so
def test_a_translation_and_the_models(api: Api, speech: dict[str, Path]) -> None:
    client = api.openai()
    with open(speech["weather"], "rb") as file:
        translated = client.audio.translations.create(file=file, model="whisper-1")
    assert {"weather", "sunny", "breeze"} <= set(words(translated.text)), translated.text
    jobs = [j for j in api.daemon.client.status() if j.task == "translate"]
    assert jobs and jobs[0].state is JobState.COMPLETED

    assert {m.id for m in client.models.list()} == {"tiny.en", "whisper-1"}
    assert client.models.retrieve("tiny.en").id == "tiny.en"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("large-v9")
    assert error_of(missing.value)["code"] == "not_found"


def test_a_stream_gives_the_text_as_it_is_decoded(api: Api, speech: dict[str, Path]) -> None:
    client = api.openai()
    with open(speech["medium"], "rb") as file:
        stream = client.audio.transcriptions.create(file=file, model="whisper-1", stream=True)
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events[len(deltas) :]] == ["transcript.text.done"]
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert len(deltas) > 1 and "".join(deltas).strip() == done.text
    assert {"quarterly", "budget"} <= set(words(done.text))


def test_a_wrong_or_revoked_token_is_refused(api: Api) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        api.openai("wsd_00000000_not-a-real-secret").models.list()
    assert error_of(wrong.value)["code"] == "unauthorized"

    made = api.daemon.client.token_create("root", comment="to revoke")
    client = api.openai(made.token)
    assert client.models.list().data
    api.daemon.client.token_revoke(made.info.id)
    with pytest.raises(openai.AuthenticationError) as revoked:
        client.models.list()
    assert error_of(revoked.value)["code"] == "unauthorized"
    assert api.openai().models.list().data, "other tokens still work"


def test_uploads_too_large_or_too_long_are_refused_and_leave_nothing(
    api: Api, speech: dict[str, Path]
) -> None:
    client = api.openai()
    before = api.spool()

    with pytest.raises(openai.APIStatusError) as big:
        client.audio.transcriptions.create(
            file=("big.wav", os.urandom(MAX_UPLOAD_BYTES + MIB)), model="whisper-1"
        )
    assert big.value.status_code == 413 and error_of(big.value)["code"] == "audio_too_large"
    assert api.spool() <= before

    long_clip = speech["long"]
    assert long_clip.stat().st_size < MAX_UPLOAD_BYTES and audio.duration_s(long_clip) > MAX_DURATION_S
    with open(long_clip, "rb") as file, pytest.raises(openai.APIStatusError) as long:
        client.audio.transcriptions.create(file=file, model="whisper-1")
    assert long.value.status_code == 413 and error_of(long.value)["code"] == "audio_too_large"
    assert "max_audio_duration_s" in error_of(long.value)["message"], "refused for its duration"
    assert api.spool() <= before
    assert not [j for j in api.daemon.client.status() if j.filename.endswith(("big.wav", "long.wav"))]


def test_a_request_refused_for_its_fields_leaves_nothing(api: Api, speech: dict[str, Path]) -> None:
    client = api.openai()
    before = api.spool()
    jobs_before = len(api.daemon.client.status())
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"model": "large-v9"}, "unknown_model"),  # not in [models]
        ({"model": "whisper-1", "language": "not a language"}, "bad_request"),
        ({"model": "whisper-1", "extra_body": {"colour": "blue"}}, "bad_request"),  # not a field of the API
        ({"model": "whisper-1", "extra_body": {"response_format": "docx"}}, "bad_request"),
    ]
    for options, code in refusals:
        with open(speech["fox"], "rb") as file, pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(file=file, **options)
        assert error_of(refused.value)["code"] == code, options
        assert api.spool() <= before
    assert len(api.daemon.client.status()) == jobs_before, "no job was made"


def test_an_undecodable_upload_fails_its_job_and_leaves_nothing(api: Api) -> None:
    before = api.spool()
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        api.openai().audio.transcriptions.create(file=("junk.wav", os.urandom(300_000)), model="whisper-1")
    error = error_of(failed.value)
    assert error["code"] == "job_failed"
    [job] = [j for j in api.daemon.client.status() if j.filename.endswith("junk.wav")]
    assert job.state is JobState.FAILED and f"job {job.id}" in error["message"]

    stream = api.openai().audio.transcriptions.create(
        file=("junk-streamed.wav", os.urandom(300_000)), model="whisper-1", stream=True
    )
    with pytest.raises(openai.APIError) as ended:  # the stream's last event is the error
        list(stream)
    assert isinstance(ended.value.body, dict) and ended.value.body["code"] == "job_failed"
    api.daemon.wait_for(lambda: api.spool() <= before, 30, "the failed job's audio removed")


def test_a_users_token_makes_its_jobs_and_not_anothers(
    api: Api, stranger: Stranger, speech: dict[str, Path]
) -> None:
    theirs = api.openai(stranger.token)
    with open(speech["report"], "rb") as file:
        text = theirs.audio.transcriptions.create(file=file, model="whisper-1").text
    assert {"send", "report", "friday"} <= set(words(text)), text
    [made] = [j for j in api.daemon.client.status() if j.filename == "report.wav"]
    assert made.owner_uid == stranger.uid, "an ordinary job, the token's user its owner"
    listed = theirs.get("/whisperd/jobs", cast_to=object)
    assert isinstance(listed, dict) and [j["id"] for j in listed["jobs"]] == [made.id], "its own jobs only"

    [job] = api.daemon.client.submit([str(speech["fox"])])  # root's, through the socket
    api.daemon.wait_terminal([job.id])
    for path in (
        f"/whisperd/jobs/{job.id}",
        f"/whisperd/jobs/{job.id}/result",
        f"/whisperd/jobs/{job.id}/events",
    ):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            theirs.get(path, cast_to=object)
        assert error_of(refused.value)["code"] == "permission_denied"
    with pytest.raises(openai.PermissionDeniedError):
        theirs.delete(f"/whisperd/jobs/{job.id}", cast_to=object)
    mine = api.openai().get(f"/whisperd/jobs/{job.id}", cast_to=object)
    assert isinstance(mine, dict) and mine["state"] == "COMPLETED"


# ---- curl ----------------------------------------------------------------------------------------------


def test_curl_without_a_token_is_unauthorized(api: Api) -> None:
    for args in (
        [f"{api.url}/v1/models"],
        ["-X", "POST", "-F", "model=whisper-1", f"{api.url}/v1/audio/transcriptions"],
        [f"{api.url}/v1/whisperd/jobs"],
    ):
        status, headers, body = curl(*args)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "unauthorized" and error["type"] == "authentication_error"
    status, _, body = curl("-H", "Authorization: Basic cm9vdDpyb290", f"{api.url}/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"


def test_curl_runs_a_job_through_the_jobs_api(api: Api, stranger: Stranger, longer: Path) -> None:
    status, headers, body = curl(
        "-F", f"file=@{longer}", "-F", "model=whisper-1", "-F", "word_timestamps=true",
        f"{api.url}/v1/whisperd/jobs", token=stranger.token,
    )  # fmt: skip
    assert status == 202, body
    [created] = json.loads(body)["jobs"]
    job_id = created["id"]
    assert headers["location"] == f"/v1/whisperd/jobs/{job_id}"
    [seen] = api.daemon.client.status([job_id])  # an ordinary job, its owner the token's user
    assert seen.owner_uid == stranger.uid and seen.filename == "longer.wav"

    status, _, events_body = curl("-N", f"{api.url}/v1/whisperd/jobs/{job_id}/events", token=stranger.token)
    assert status == 200
    events = sse(events_body)
    states = [data["state"] for name, data in events if name == "job"]
    segments = [s for name, data in events if name == "segments" for s in data["segments"]]
    assert states and states[-1] == "COMPLETED" and all(not JobState(s).terminal for s in states[:-1])
    assert segments, "segments came as they were decoded"
    assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))

    status, _, body = curl(f"{api.url}{headers['location']}", token=stranger.token)
    view = json.loads(body)
    assert status == 200 and view["state"] == "COMPLETED" and view["owner_uid"] == stranger.uid

    result_url = f"{api.url}/v1/whisperd/jobs/{job_id}/result"
    status, _, body = curl(result_url, token=stranger.token)
    transcript = json.loads(body)["transcript"]
    assert status == 200 and [s["id"] for s in transcript["segments"]] == [s["id"] for s in segments]
    duration_s = audio.duration_s(longer)
    formats = {}
    for response_format in ("srt", "vtt", "text", "verbose_json"):
        status, headers, body = curl(f"{result_url}?response_format={response_format}", token=stranger.token)
        assert status == 200, body
        formats[response_format] = body.decode()
    check_cues(srt_cues(formats["srt"]), duration_s, transcript["text"])
    assert srt_cues(formats["srt"]) == vtt_cues(formats["vtt"])
    assert len(srt_cues(formats["srt"])) == len(transcript["segments"])
    assert words(formats["text"]) == words(transcript["text"])
    verbose = json.loads(formats["verbose_json"])
    assert verbose["words"] and len(verbose["segments"]) == len(transcript["segments"])

    status, _, body = curl("-X", "DELETE", f"{api.url}/v1/whisperd/jobs/{job_id}", token=stranger.token)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request", "a finished job"
    status, _, body = curl(
        f"{api.url}/v1/whisperd/jobs/{job_id}/result?response_format=docx", token=api.token
    )
    assert status == 400, "root's token reads anyone's job, but not in a format there is not"


# ---- a client that leaves ----------------------------------------------------------------------------


def multipart(path: Path, filename: str, **fields: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    body = b"".join(parts) + head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("stream", [False, True], ids=["waiting", "streaming"])
def test_a_client_that_disconnects_cancels_its_job(api: Api, longer: Path, stream: bool) -> None:
    filename = f"leaving-{uuid.uuid4().hex[:8]}.wav"
    body, content_type = multipart(longer, filename, model="whisper-1", stream=str(stream).lower())
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=120)
    connection.request(
        "POST", "/v1/audio/transcriptions", body=body,
        headers={"Authorization": f"Bearer {api.token}", "Content-Type": content_type},
    )  # fmt: skip

    def job() -> Any:
        found = [j for j in api.daemon.client.status() if j.filename == filename]
        return found[0] if found else None

    api.daemon.wait_for(lambda: job() is not None and job().state is JobState.PROCESSING, 60, "the job runs")
    if stream:
        response = connection.getresponse()  # the stream has begun: its headers came
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert connection.sock is not None
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    [final] = api.daemon.wait_terminal([job().id], 60)
    assert final.state is JobState.CANCELLED


# ---- anonymous access, and the metrics at the API's address -----------------------------------------


@pytest.fixture(scope="module")
def anonymous(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """No workers (jobs stay PENDING), anonymous access on loopback, metrics served at the API's port."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    daemon = DaemonProcess(
        tmp_path_factory.mktemp("http-anonymous") / "state",
        {"workers": {"cpu_workers": 0}, "http": {"allow_anonymous_loopback": True}},
        env={"WHISPERD_HTTP_ADDR": address, "WHISPERD_METRICS_ADDR": address},
    ).start()
    api = Api(daemon, port, daemon.client.token_create("root").token)
    yield api
    api.close()


def test_anonymous_requests_on_loopback_act_as_nobody(anonymous: Api, speech: dict[str, Path]) -> None:
    status, _, body = curl("-F", f"file=@{speech['fox']}", f"{anonymous.url}/v1/whisperd/jobs")
    assert status == 202, body
    [created] = json.loads(body)["jobs"]
    [seen] = anonymous.daemon.client.status([created["id"]])
    assert seen.owner_uid == NOBODY_UID and seen.state is JobState.PENDING

    status, _, body = curl(f"{anonymous.url}/v1/whisperd/jobs")
    assert status == 200 and [j["id"] for j in json.loads(body)["jobs"]] == [created["id"]]

    status, _, body = curl(f"{anonymous.url}/v1/models", token="wsd_00000000_wrong")
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", "a wrong token is no one"

    status, _, body = curl("-X", "DELETE", f"{anonymous.url}/v1/whisperd/jobs/{created['id']}")
    assert status == 200, body
    [cancelled] = json.loads(body)["jobs"]
    assert cancelled["state"] == "CANCELLED"
    assert anonymous.daemon.job(created["id"]).state is JobState.CANCELLED


def test_the_metrics_and_the_api_share_one_port(anonymous: Api) -> None:
    metrics = scrape(anonymous.port, "/metrics")
    assert "whisperd_jobs" in metrics
    status, _, body = curl(f"{anonymous.url}/v1/models", token=anonymous.token)
    assert status == 200 and "whisper-1" in [m["id"] for m in json.loads(body)["data"]]
    status, _, _ = curl(f"{anonymous.url}/metrics", token="wsd_00000000_wrong")
    assert status == 200, "the metrics ask for no token, and a wrong one does not matter"
