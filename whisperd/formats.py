"""Transcript documents. Pure: no I/O. The files whisperctl writes (`format_transcript`: txt, srt, vtt, tsv,
json) and the bodies of OpenAI's /v1/audio/transcriptions and /translations answers (`openai_response`:
json, text, srt, vtt, verbose_json), so that the HTTP API and the command line write the same subtitles."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Collection

import msgspec

from whisperd.protocol import Segment, Transcript

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TIMESTAMP_GRANULARITIES = ("segment", "word")

JSON_TYPE = "application/json"
# What OpenAI answers for text, srt and vtt alike (observed: `content-type: text/plain; charset=utf-8`).
TEXT_TYPE = "text/plain; charset=utf-8"

# Whisper's languages (openai-whisper's tokenizer.LANGUAGES): verbose_json names the language as OpenAI
# does, in English and lowercase. faster-whisper ships the codes only.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian",
    "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque",
    "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian", "bs": "bosnian",
    "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi",
    "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese", "ht": "haitian creole",
    "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip

# Whatever a reader may take for the end of a line (Python's str.splitlines() takes all of these).
_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+\s*")


# ---- whisperctl's files -------------------------------------------------------------------------------


def _millis(seconds: float) -> int:
    # Half-up, not round(): banker's rounding on a float product turns 1.0005 s into 1.000 s.
    return max(0, math.floor(seconds * 1000.0 + 0.5))


def format_timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS<decimal>mmm, rounded to the millisecond; negative times clamp to zero (hours past 99 take
    more digits)."""
    ms = _millis(seconds)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cue_text(segment: Segment) -> str:
    # "-->" inside a cue would be read as a timing line by subtitle parsers (openai-whisper writes "->" too,
    # but once: "--->" became "-->"), and a blank line ends a cue: a cue is one line.
    text = _LINE_BREAKS.sub(" ", segment.text.strip())
    while "-->" in text:
        text = text.replace("-->", "->")
    return text


def _vtt_text(segment: Segment) -> str:
    # WebVTT reads "<" as a tag and "&" as an entity: escaped, as the format requires (">" may stay).
    return _cue_text(segment).replace("&", "&amp;").replace("<", "&lt;")


def _txt(transcript: Transcript) -> str:
    return "".join(f"{segment.text.strip()}\n" for segment in transcript.segments)


def _srt(transcript: Transcript) -> str:
    cues = [
        f"{i}\n{format_timestamp(s.start, ',')} --> {format_timestamp(s.end, ',')}\n{_cue_text(s)}\n"
        for i, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(cues)


def _vtt(transcript: Transcript) -> str:
    cues = [
        f"{format_timestamp(s.start, '.')} --> {format_timestamp(s.end, '.')}\n{_vtt_text(s)}\n"
        for s in transcript.segments
    ]
    return "\n".join(["WEBVTT\n", *cues])


def _tsv(transcript: Transcript) -> str:
    # Tabs inside the text would add columns, so they become spaces.
    rows = [
        f"{_millis(s.start)}\t{_millis(s.end)}\t{s.text.strip().replace(chr(9), ' ')}\n"
        for s in transcript.segments
    ]
    return "".join(["start\tend\ttext\n", *rows])


def _json(transcript: Transcript) -> str:
    return msgspec.json.format(msgspec.json.encode(transcript), indent=2).decode() + "\n"


_WRITERS: dict[str, Callable[[Transcript], str]] = {
    "txt": _txt,
    "srt": _srt,
    "vtt": _vtt,
    "tsv": _tsv,
    "json": _json,
}


def format_transcript(transcript: Transcript, fmt: str) -> str:
    """The transcript as a txt, srt, vtt, tsv or json document, ending with a newline (txt/srt: empty if
    there are no segments)."""
    try:
        writer = _WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    return writer(transcript)


# ---- OpenAI's answers ---------------------------------------------------------------------------------


class _Word(msgspec.Struct):
    word: str
    start: float
    end: float


class _Segment(msgspec.Struct):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class _Verbose(msgspec.Struct, omit_defaults=True):
    task: str
    language: str
    duration: float
    text: str
    segments: list[_Segment] | None = None  # None (absent): only words were asked for
    words: list[_Word] | None = None  # None (absent): words were not asked for


def language_name(code: str) -> str:
    """The language as OpenAI names it ("en": "english"); a code Whisper does not know stays as it is."""
    return LANGUAGE_NAMES.get(code, code)


def compression_ratio(text: str) -> float:
    """Whisper's measure of repetition: the text's UTF-8 length over its zlib-compressed length."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _openai_segment(index: int, s: Segment) -> _Segment:
    # Decoder figures a transcript lacks (stored before they were kept, or a decoder that gives none) read
    # as 0, except the compression ratio, which is computed from the text as Whisper does. Token ids are
    # not kept (they would double a transcript's size): an empty list.
    return _Segment(
        id=index, seek=s.seek, start=s.start, end=s.end, text=s.text, tokens=[],
        temperature=0.0 if s.temperature is None else s.temperature,
        avg_logprob=0.0 if s.avg_logprob is None else s.avg_logprob,
        compression_ratio=compression_ratio(s.text) if s.compression_ratio is None else s.compression_ratio,
        no_speech_prob=0.0 if s.no_speech_prob is None else s.no_speech_prob,
    )  # fmt: skip


def _verbose(transcript: Transcript, task: str, granularities: Collection[str]) -> bytes:
    segments = words = None
    if not granularities or "segment" in granularities:
        segments = [_openai_segment(i, s) for i, s in enumerate(transcript.segments)]
    if "word" in granularities:  # OpenAI's words carry no surrounding spaces, Whisper's a leading one
        words = [
            _Word(word=w.word.strip(), start=w.start, end=w.end)
            for s in transcript.segments
            for w in s.words or ()
        ]
    body = _Verbose(
        task=task, language=language_name(transcript.language), duration=transcript.duration_s,
        text=transcript.text, segments=segments, words=words,
    )  # fmt: skip
    return msgspec.json.encode(body)


def openai_response(
    transcript: Transcript,
    response_format: str,
    task: str = "transcribe",
    granularities: Collection[str] = frozenset(),
) -> tuple[bytes, str]:
    """The body and content type OpenAI answers a transcription (task "transcribe") or translation
    ("translate") with, in response_format (RESPONSE_FORMATS). granularities: timestamp_granularities[]
    (TIMESTAMP_GRANULARITIES; none: segments only), read by verbose_json alone, as OpenAI does. Raises
    ValueError for a format or granularity it does not know."""
    unknown = set(granularities) - set(TIMESTAMP_GRANULARITIES)
    if unknown:
        raise ValueError(
            f"unknown timestamp granularity {sorted(unknown)[0]!r}; choose among "
            f"{', '.join(TIMESTAMP_GRANULARITIES)}"
        )
    if response_format == "json":
        return msgspec.json.encode({"text": transcript.text}), JSON_TYPE
    if response_format == "text":
        return f"{transcript.text}\n".encode(), TEXT_TYPE
    if response_format == "srt":
        return _srt(transcript).encode(), TEXT_TYPE
    if response_format == "vtt":
        return _vtt(transcript).encode(), TEXT_TYPE
    if response_format == "verbose_json":
        return _verbose(transcript, task, granularities), JSON_TYPE
    raise ValueError(
        f"unknown response_format {response_format!r}; choose one of {', '.join(RESPONSE_FORMATS)}"
    )
