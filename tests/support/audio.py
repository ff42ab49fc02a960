"""Test audio: real speech from espeak-ng, shaped with sox."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SENTENCES = {
    "fox": "The quick brown fox jumps over the lazy dog.",
    "weather": "Tomorrow the weather will be sunny with a light breeze from the north.",
    "report": "Please send the report to the finance team before Friday.",
}
LONG_TEXT = (
    "Good morning everyone and welcome to the quarterly meeting. Today we will discuss the budget, "
    "the hiring plan, and the new office in the north. First, the budget is on track and spending is "
    "lower than expected. Second, we plan to hire four engineers and two designers before the summer. "
    "Finally, the new office will open in the autumn, and everyone is welcome to visit. "
)


def have_tools() -> bool:
    return all(shutil.which(t) for t in ("espeak-ng", "sox"))


def speak(text: str, path: Path, speed_wpm: int = 160, voice: str = "en") -> Path:
    """16 kHz mono WAV of the spoken text (voice: an espeak-ng language; its French is not understood by
    Whisper's base model, its Spanish and German are)."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(path)], check=True)
    raw.unlink()
    return path


def long_speech(path: Path, repeats: int) -> Path:
    """Several minutes of speech, so a job stays PROCESSING long enough to act on it."""
    return speak(LONG_TEXT * repeats, path)


def duration_s(path: Path) -> float:
    out = subprocess.run(["soxi", "-D", str(path)], check=True, capture_output=True, text=True)
    return float(out.stdout)
