"""The spoken corpus of bench/batching.py: clips of known words (espeak-ng, sox), cached, and word error rate.

Every clip is made of whole sentences spoken one at a time and joined with short silences, so that each clip's
reference text is exactly the words spoken. Texts avoid digits and abbreviations and use American spelling
(as tiny.en writes), so that the normalisation below (lowercase, no punctuation, digits as words) is all a
fair comparison needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.audio import LONG_TEXT, SENTENCES, duration_s, speak  # noqa: E402

PARAGRAPHS = (
    " ".join(SENTENCES.values()),
    LONG_TEXT,
    "The library will close early on Thursday because the heating system needs repair. Books that are due "
    "this week can be returned at the front desk of the town hall. The reading room on the second floor "
    "will stay open for students who booked a place in advance. We are sorry for the trouble and thank "
    "you for your patience.",
    "To make fresh bread you need flour, water, salt and a little yeast. Mix everything in a large bowl and "
    "knead the dough for about ten minutes until it feels smooth. Leave it to rise in a warm place for two "
    "hours, then shape it gently into a round loaf. Bake it in a hot oven until the crust is golden and the "
    "bottom sounds hollow when you tap it.",
    "The train to the coast leaves from platform seven every hour. Passengers with bicycles should use the "
    "last carriage, where there is more space. Tickets can be bought from the machines in the hall or from "
    "the conductor on board. Please keep your luggage away from the doors and mind the gap when you step "
    "off the train.",
    "Our garden was very quiet this spring. The apple tree flowered late, and the bees only came back in "
    "May. My neighbor planted tomatoes, beans and potatoes along the fence, and every evening she waters "
    "them with rain from a large green barrel. By the end of the summer we hope to share the harvest with "
    "the whole street.",
    "The museum has opened a new room about the history of the river. Visitors can see old maps, fishing "
    "boats and tools that were used by the people who lived on its banks. A short film explains how the "
    "water was used to turn the mills and carry goods to the market. Children can draw their own map and "
    "take it home.",
    "Last night the storm brought strong winds and heavy rain to the whole region. Several trees fell across "
    "the roads, and some villages were without power until the morning. The council asks drivers to take "
    "care and to avoid the valley road, which is still flooded. Schools will open as usual, but buses may "
    "be a little late.",
    "Learning a new language takes time, but a few minutes every day make a real difference. Listen to the "
    "radio, read simple stories and try to speak with other people, even if you make mistakes. Write down "
    "new words in a small notebook and look at them again before you go to sleep. After a few months you "
    "will be surprised how much you understand.",
    "The doctor said that my knee should heal in a few weeks. I have to rest, keep my leg raised and walk "
    "only short distances at first. Each morning I do a set of gentle exercises that the nurse showed me. "
    "If the pain gets worse, I should call the clinic and ask for another appointment.",
    "The football club is looking for volunteers to help at the match on Saturday. We need people to sell "
    "tickets, to guide visitors to their seats and to serve hot drinks at halftime. Everyone who helps "
    "will get a free scarf and a meal after the game. Please write your name on the list by the door of "
    "the clubhouse.",
    "Before you start the machine, check that the cover is closed and that the power cable is not damaged. "
    "Press the green button once and wait until the light stops flashing. If you hear a strange noise, "
    "switch it off at once and call the technician. Never open the cover while the machine is running.",
    "Every winter the birds come back to the lake in large numbers. Some of them fly thousands of "
    "kilometers from the north to find open water and enough food. The best time to watch them is early "
    "in the morning, when the mist is still lying over the water. Bring warm clothes, a flask of tea and "
    "a good pair of glasses.",
    "The new software update will be installed on all office computers tonight. Please save your work and "
    "leave your computer switched on when you go home. The update fixes several problems with printing and "
    "makes the email program start faster. If anything does not work tomorrow, call the help desk and they "
    "will come to your desk.",
    "My grandfather was a carpenter, and his workshop always smelled of fresh wood and oil. He made chairs, "
    "tables and small boxes for the people of the village. When I was a child, he let me sweep the floor "
    "and sort the nails into glass jars. He told me that a good piece of work needs patience more than "
    "anything else.",
    "The hotel is a short walk from the beach and the old harbor. Breakfast is served on the terrace from "
    "seven until ten, and guests can borrow towels and umbrellas at the reception. In the evening a small "
    "band plays music in the garden. Please let us know if you need a taxi to the airport on the day you "
    "leave.",
    "Scientists have found a new kind of frog in the forests of the mountains. It is smaller than a coin "
    "and has bright orange spots on its back. The frog lives high in the trees and only comes down to the "
    "ground when it rains. The team hopes that the discovery will help to protect the forest from logging.",
    "Thank you all for coming to the meeting tonight. We want to talk about the new playground in the park "
    "and how the money should be spent. Some parents would like more swings, while others think a climbing "
    "frame would be safer for older children. We will collect your ideas on the board and vote at the end "
    "of the evening.",
    "The farmers market takes place in the square every Sunday morning. You can buy fresh vegetables, "
    "cheese, honey and flowers straight from the people who grow them. Many stalls sell warm soup and "
    "coffee, so it is a good place to meet friends. Bring your own bags, because the market tries to use "
    "as little plastic as possible.",
    "When you move into a new flat, there are many small things to do. You have to register your address, "
    "set up the electricity and the internet, and learn which day the rubbish is collected. It also helps "
    "to introduce yourself to the neighbors. They can tell you where to find a good baker and a doctor "
    "nearby.",
)
CLIP_TARGETS_S = (5, 8, 12, 16, 20, 25, 30, 35, 40, 45, 50, 60)  # about 346 s in all
LONG_TARGET_S = 600.0
CLIP_WPM = 160
LONG_WPMS = (150, 175)  # the long recording speaks the paragraphs again at other speeds, not the same audio
GAP_S = 0.4  # silence between sentences


@dataclass(frozen=True)
class Clip:
    path: str
    text: str  # the words spoken
    duration_s: float


def sentences() -> list[str]:
    return [s for paragraph in PARAGRAPHS for s in re.split(r"(?<=\.)\s+", paragraph.strip()) if s]


def _spoken(text: str, wpm: int, folder: Path) -> tuple[Path, float]:
    name = hashlib.sha1(f"{wpm}:{text}".encode()).hexdigest()[:16]
    path = folder / "sentences" / f"{name}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{name}.tmp.wav")
        speak(text, tmp, wpm)
        tmp.rename(path)
    return path, duration_s(path)


def _join(parts: list[Path], silence: Path, out: Path) -> None:
    args: list[str] = []
    for part in parts:
        args += [str(part), str(silence)]
    subprocess.run(["sox", *args[:-1], str(out)], check=True)


def build(folder: Path) -> tuple[list[Clip], Clip]:
    """The 12 clips and the ~10-minute recording, made once per version of the texts and kept in folder."""
    digest = hashlib.sha1(repr((PARAGRAPHS, CLIP_TARGETS_S, LONG_TARGET_S, GAP_S)).encode()).hexdigest()
    folder = folder / digest[:12]
    manifest = folder / "corpus.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        return [Clip(**c) for c in data["clips"]], Clip(**data["long"])
    folder.mkdir(parents=True, exist_ok=True)
    silence = folder / "silence.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(silence), "trim", "0", str(GAP_S)])
    spoken = [(text, *_spoken(text, CLIP_WPM, folder)) for text in sentences()]
    clips, i = [], 0
    for n, target_s in enumerate(CLIP_TARGETS_S):
        parts: list[tuple[str, Path, float]] = []
        while i < len(spoken):  # whole sentences, as close to the target as they come, at least 90 % of it
            now_s, then_s = _length(parts), _length([*parts, spoken[i]])
            if now_s >= 0.9 * target_s and abs(then_s - target_s) >= abs(now_s - target_s):
                break
            parts.append(spoken[i])
            i += 1
        path = folder / f"clip{n:02d}.wav"
        _join([p for _, p, _ in parts], silence, path)
        clips.append(Clip(str(path), " ".join(t for t, _, _ in parts), duration_s(path)))
    long_parts: list[tuple[str, Path, float]] = []
    for wpm in LONG_WPMS:
        for text in sentences():
            if _length(long_parts) >= LONG_TARGET_S:
                break
            long_parts.append((text, *_spoken(text, wpm, folder)))
    path = folder / "long.wav"
    _join([p for _, p, _ in long_parts], silence, path)
    long = Clip(str(path), " ".join(t for t, _, _ in long_parts), duration_s(path))
    manifest.write_text(json.dumps({"clips": [asdict(c) for c in clips], "long": asdict(long)}, indent=1))
    return clips, long


def _length(parts: list[tuple[str, Path, float]]) -> float:
    return sum(d for _, _, d in parts) + GAP_S * max(0, len(parts) - 1)


# ---- word error rate ----------------------------------------------------------------------------------

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen")  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """An integer in words, without "and" (below a million; larger ones are left as digits)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return f"{_ONES[n // 100]} hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return f"{number_words(n // 1000)} thousand" + ("" if rest == 0 else " " + number_words(rest))
    return str(n)


def normalise(text: str) -> list[str]:
    """Lowercase words without punctuation; digits as words ("4" and "four" are the same word)."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())  # 1,000 -> 1000
    text = re.sub(r"[-/]", " ", text).replace("%", " percent")
    text = re.sub(r"[^\w\s]", "", text)  # apostrophes too: don't -> dont on both sides
    words: list[str] = []
    for word in text.split():
        words += number_words(int(word)).split() if word.isdigit() else [word]
    return words


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions, insertions, deletions)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Corpus WER of (reference, transcript) pairs: total edits / total reference words."""
    edits = words = 0
    for ref, hyp in pairs:
        r = normalise(ref)
        edits += edit_distance(r, normalise(hyp))
        words += len(r)
    return edits / max(1, words)
