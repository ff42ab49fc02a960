"""Transcript documents (whisperd/formats.py): subtitles read back by the real `srt` and `webvtt-py` parsers,
and OpenAI's response bodies validated by the `openai` SDK's own types, as a client of the API reads them."""

from __future__ import annotations

import ast
import html
import importlib.util
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import srt
import webvtt
from hypothesis import given
from hypothesis import strategies as st
from openai.types.audio import Transcription, TranscriptionVerbose, TranslationVerbose
from webvtt.models import Timestamp

from whisperd.formats import (
    FORMATS,
    LANGUAGE_NAMES,
    RESPONSE_FORMATS,
    compression_ratio,
    format_transcript,
    language_name,
    openai_response,
)
from whisperd.protocol import Segment, Transcript, Word

TEXT = "text/plain; charset=utf-8"


def millis(seconds: float) -> int:
    return max(0, math.floor(seconds * 1000 + 0.5))


def transcript(*segments: Segment, language: str = "en") -> Transcript:
    return Transcript(
        language=language, language_probability=0.9, duration_s=max((s.end for s in segments), default=0.0),
        text="".join(s.text for s in segments).strip(), segments=list(segments),
    )  # fmt: skip


def decoded(sid: int, start: float, end: float, text: str, words: list[Word] | None = None) -> Segment:
    """A segment as faster-whisper's decoder fills it."""
    return Segment(
        id=sid, start=start, end=end, text=text, words=words, seek=int(start * 100), temperature=0.2,
        avg_logprob=-0.31, compression_ratio=1.4, no_speech_prob=0.05,
    )  # fmt: skip


TRICKY = transcript(
    decoded(1, 0.0, 1.5, " arrows --> inside ---> and ---->"),
    Segment(id=2, start=1.5, end=2.0, text=""),  # an empty segment (Whisper makes them)
    decoded(3, 2.0, 3.0015, " two\n\nparagraphs\r\nand\u2028more\x1cseparators"),
    decoded(4, 3.0, 4.0, " <i>tags</i> & &amp; entities"),
    decoded(5, 4.0, 5.0, " naïve 日本語 العربية 🎙"),
    decoded(6, 4.5, 4.5, " zero length"),
    decoded(7, 360_000.0, 360_001.25, " hour one hundred"),  # hours > 99 take three digits
)
# What each cue reads once parsed: one line, no "-->" (openai-whisper writes "->" too).
TRICKY_TEXT = [
    "arrows -> inside -> and ->", "", "two paragraphs and more separators", "<i>tags</i> & &amp; entities",
    "naïve 日本語 العربية 🎙", "zero length", "hour one hundred",
]  # fmt: skip


def parse_srt(text: str) -> list[srt.Subtitle]:
    return list(srt.parse(text))


def parse_vtt(text: str) -> list[Any]:
    return list(webvtt.from_buffer(io.StringIO(text)))


def vtt_millis(stamp: str) -> int:
    return int(Timestamp.from_string(stamp).in_milliseconds())


# ---- subtitles read back by real parsers ---------------------------------------------------------------


def test_srt_reads_back_cue_by_cue() -> None:
    cues = parse_srt(format_transcript(TRICKY, "srt"))
    assert [c.index for c in cues] == list(range(1, len(TRICKY.segments) + 1))
    assert [round(c.start.total_seconds() * 1000) for c in cues] == [millis(s.start) for s in TRICKY.segments]
    assert [round(c.end.total_seconds() * 1000) for c in cues] == [millis(s.end) for s in TRICKY.segments]
    assert [c.content for c in cues] == TRICKY_TEXT
    assert round(cues[-1].start.total_seconds()) == 360_000


def test_vtt_reads_back_cue_by_cue() -> None:
    document = format_transcript(TRICKY, "vtt")
    assert document.startswith("WEBVTT\n\n")
    cues = parse_vtt(document)
    assert len(cues) == len(TRICKY.segments)
    assert [vtt_millis(c.start) for c in cues] == [millis(s.start) for s in TRICKY.segments]
    assert [vtt_millis(c.end) for c in cues] == [millis(s.end) for s in TRICKY.segments]
    # "<" and "&" are escaped, as WebVTT requires: no cue tag is read into the text, and a player shows it
    # as it was said.
    assert [html.unescape(c.raw_text) for c in cues] == TRICKY_TEXT
    assert "&lt;i>tags&lt;/i> &amp; &amp;amp; entities" in document
    assert cues[-1].start == "100:00:00.000"


def test_openai_srt_and_vtt_are_the_same_documents() -> None:
    assert openai_response(TRICKY, "srt") == (format_transcript(TRICKY, "srt").encode(), TEXT)
    assert openai_response(TRICKY, "vtt") == (format_transcript(TRICKY, "vtt").encode(), TEXT)


def test_no_segments_no_cues() -> None:
    empty = transcript()
    assert parse_srt(format_transcript(empty, "srt")) == []
    assert parse_vtt(format_transcript(empty, "vtt")) == []


# Any text a decoder could produce on one line (line breaks are checked above); times of up to 200 hours.
LINE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")) | st.sampled_from("->"), max_size=40
)
TIMES = st.floats(min_value=0.0, max_value=720_000.0, allow_nan=False)


@given(st.lists(st.tuples(TIMES, TIMES, LINE_TEXT), max_size=8))
def test_any_transcript_reads_back(raw: list[tuple[float, float, str]]) -> None:
    segments = [Segment(id=i, start=a, end=a + b / 1000, text=t) for i, (a, b, t) in enumerate(raw, 1)]
    document = transcript(*segments)
    expected = [re.sub("-{2,}>", "->", s.text.strip()) for s in segments]  # no arrow left, however long
    srt_cues = parse_srt(format_transcript(document, "srt"))
    assert [c.content.strip() for c in srt_cues] == [t.strip() for t in expected]
    assert [round(c.end.total_seconds() * 1000) for c in srt_cues] == [millis(s.end) for s in segments]
    vtt_cues = parse_vtt(format_transcript(document, "vtt"))
    assert [html.unescape(c.raw_text).strip() for c in vtt_cues] == [t.strip() for t in expected]
    assert [vtt_millis(c.start) for c in vtt_cues] == [millis(s.start) for s in segments]


# ---- OpenAI's bodies ----------------------------------------------------------------------------------

WORDS = [
    Word(start=0.0, end=0.4, word=" Hello", probability=0.9),
    Word(start=0.4, end=1.0, word=" there.", probability=0.8),
]
SPOKEN = transcript(
    decoded(1, 0.0, 1.0, " Hello there.", WORDS),
    decoded(2, 1.0, 2.5, " General Kenobi.", [Word(start=1.0, end=2.5, word=" Kenobi.", probability=0.7)]),
)


def body(response: tuple[bytes, str]) -> Any:
    content, content_type = response
    assert content_type == "application/json"
    return json.loads(content)


def test_json_is_the_text_alone() -> None:
    answer = body(openai_response(SPOKEN, "json"))
    assert answer == {"text": "Hello there. General Kenobi."}
    assert Transcription.model_validate(answer).text == "Hello there. General Kenobi."


def test_text_is_plain_text() -> None:
    assert openai_response(SPOKEN, "text") == (b"Hello there. General Kenobi.\n", TEXT)
    assert openai_response(TRICKY, "text")[0].decode() == TRICKY.text + "\n"


def test_verbose_json_has_segments_by_default() -> None:
    answer = body(openai_response(SPOKEN, "verbose_json", "transcribe", frozenset()))
    assert list(answer) == ["task", "language", "duration", "text", "segments"]  # no "words" unless asked
    verbose = TranscriptionVerbose.model_validate(answer)
    assert (answer["task"], verbose.language, verbose.duration) == ("transcribe", "english", 2.5)
    assert verbose.text == "Hello there. General Kenobi."
    assert verbose.segments is not None and verbose.words is None
    first, second = verbose.segments
    assert (first.id, first.seek, first.start, first.end, first.text) == (0, 0, 0.0, 1.0, " Hello there.")
    assert (second.id, second.seek) == (1, 100), "numbered from 0, as OpenAI does"
    assert (first.tokens, first.temperature, first.avg_logprob) == ([], 0.2, -0.31)
    assert (first.compression_ratio, first.no_speech_prob) == (1.4, 0.05)


def test_verbose_json_words_only() -> None:
    answer = body(openai_response(SPOKEN, "verbose_json", "transcribe", frozenset({"word"})))
    assert "segments" not in answer
    verbose = TranscriptionVerbose.model_validate(answer)
    assert verbose.words is not None
    assert [(w.word, w.start, w.end) for w in verbose.words] == [
        ("Hello", 0.0, 0.4), ("there.", 0.4, 1.0), ("Kenobi.", 1.0, 2.5),
    ]  # fmt: skip
    assert list(answer["words"][0]) == ["word", "start", "end"], "OpenAI's word: no probability"


def test_verbose_json_words_and_segments() -> None:
    answer = body(openai_response(SPOKEN, "verbose_json", "transcribe", frozenset({"word", "segment"})))
    verbose = TranscriptionVerbose.model_validate(answer)
    assert verbose.segments is not None and len(verbose.segments) == 2
    assert verbose.words is not None and len(verbose.words) == 3


def test_verbose_json_words_of_a_job_without_word_timestamps_are_none() -> None:
    plain = transcript(decoded(1, 0.0, 1.0, " Hello."))
    answer = body(openai_response(plain, "verbose_json", "transcribe", frozenset({"word"})))
    assert answer["words"] == []


def test_verbose_json_of_a_translation() -> None:
    french = transcript(decoded(1, 0.0, 2.0, " Good morning."), language="fr")
    answer = body(openai_response(french, "verbose_json", "translate"))
    assert (answer["task"], answer["language"]) == ("translate", "french")  # the language spoken
    assert TranslationVerbose.model_validate(answer).text == "Good morning."


def test_an_old_transcript_still_decodes_and_answers() -> None:
    # Stored before the decoder's figures were kept: they default, and OpenAI's shape still holds.
    stored = b'{"language":"en","language_probability":0.9,"duration_s":2.0,"text":"Old news.",'
    stored += b'"segments":[{"id":1,"start":0.0,"end":2.0,"text":" Old news.","words":null}]}'
    old = msgspec.json.decode(stored, type=Transcript)
    assert old.segments[0].seek == 0 and old.segments[0].avg_logprob is None
    verbose = TranscriptionVerbose.model_validate(body(openai_response(old, "verbose_json")))
    assert verbose.segments is not None
    [segment] = verbose.segments
    assert (segment.temperature, segment.avg_logprob, segment.no_speech_prob) == (0.0, 0.0, 0.0)
    assert segment.compression_ratio == compression_ratio(" Old news.") > 0, "computed as Whisper does"


def test_segments_round_trip_with_their_figures() -> None:
    assert msgspec.json.decode(msgspec.json.encode(SPOKEN), type=Transcript) == SPOKEN


@pytest.mark.parametrize("response_format", RESPONSE_FORMATS)
def test_every_format_answers_an_empty_transcript(response_format: str) -> None:
    content, content_type = openai_response(transcript(), response_format, "transcribe", frozenset())
    assert content_type in ("application/json", TEXT)
    if content_type == "application/json":
        assert TranscriptionVerbose.model_validate({"duration": 0.0, "language": "x", **json.loads(content)})


@pytest.mark.parametrize(
    ("response_format", "granularities"),
    [("docx", frozenset()), ("JSON", frozenset()), ("", frozenset()), ("json", frozenset({"letter"}))],
)
def test_unknown_format_or_granularity_raises(response_format: str, granularities: frozenset[str]) -> None:
    with pytest.raises(ValueError, match="unknown"):
        openai_response(SPOKEN, response_format, "transcribe", granularities)


def test_formats() -> None:
    assert RESPONSE_FORMATS == ("json", "text", "srt", "vtt", "verbose_json")
    assert FORMATS == ("txt", "srt", "vtt", "tsv", "json")


# ---- languages ---------------------------------------------------------------------------------------


def faster_whisper_codes() -> set[str]:
    """faster-whisper's language codes, read from its source without importing it (heavy)."""
    spec = importlib.util.find_spec("faster_whisper")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0], "tokenizer.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "_LANGUAGE_CODES" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("faster_whisper.tokenizer._LANGUAGE_CODES not found")


def test_every_language_whisper_knows_has_its_name() -> None:
    assert set(LANGUAGE_NAMES) == faster_whisper_codes()
    assert all(name == name.lower() and name.strip() == name for name in LANGUAGE_NAMES.values())


@pytest.mark.parametrize(
    ("code", "name"),
    [("en", "english"), ("zh", "chinese"), ("yue", "cantonese"), ("haw", "hawaiian"), ("xx", "xx")],
)
def test_language_name(code: str, name: str) -> None:
    assert language_name(code) == name
