"""GPU memory a batch of each model reserves: a baseline from the configuration, and what out-of-memory errors
have taught since. The two are kept apart, so a reload replaces the baseline and never forgets or misapplies
what was learned. What was learned fades: one error (a batch of unusually long files, another process's
memory) must not reserve more for ever, so without further errors the excess decays back to the baseline."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import msgspec

from whisperd.config import Config

# GPU memory of one batch (model weights plus decoding buffers for beam 5), in GiB, measured roughly on
# faster-whisper; the sizes are matched against the model's name and source.
_ESTIMATES_GIB: dict[str, tuple[float, float]] = {  # size: (float16, int8)
    "large": (4.5, 2.9),
    "turbo": (2.5, 1.6),
    "medium": (2.6, 1.5),
    "small": (1.2, 0.8),
    "base": (0.6, 0.5),
    "tiny": (0.5, 0.4),
}
_UNKNOWN_MODEL_GIB = (5.0, 3.0)  # err on the safe side: waiting is fine, out-of-memory is not
OUT_OF_MEMORY_GROWTH = 1.25  # each CUDA out-of-memory error raises the model's reservation by this factor
OUT_OF_MEMORY_HALF_LIFE_S = 3600.0  # without further errors, what they added halves every hour


def decayed_growth(factor: float, elapsed_s: float, half_life_s: float = OUT_OF_MEMORY_HALF_LIFE_S) -> float:
    """A factor learned elapsed_s ago, now: its excess over 1 halves at each full half_life_s. In steps,
    not smoothly: a reservation stays what the error taught for a while, and plans see it change rarely. A
    clock set back counts as no time."""
    halvings = int(max(0.0, elapsed_s) // half_life_s)
    return 1.0 + (factor - 1.0) * 0.5 ** min(halvings, 64)


class _Learned(NamedTuple):
    factor: float
    at: float  # when the last out-of-memory error set it


def estimate_model_memory_bytes(name: str, source: str, compute_type: str) -> int:
    int8 = "int8" in compute_type
    text = f"{name} {source}".lower()
    for size, (fp16_gib, int8_gib) in _ESTIMATES_GIB.items():
        if size in text:
            return int((int8_gib if int8 else fp16_gib) * 1024**3)
    fp16_gib, int8_gib = _UNKNOWN_MODEL_GIB
    return int((int8_gib if int8 else fp16_gib) * 1024**3)


class ModelBudget(msgspec.Struct, frozen=True):
    source: str  # what is loaded: a learned factor belongs to this, not to the name alone
    memory_bytes: int


def baseline_from_config(config: Config) -> dict[str, ModelBudget]:
    """Each configured model's reservation: the config's figure, else an estimate from its size."""
    return {
        name: ModelBudget(
            source,
            config.gpu.model_memory_bytes.get(name)
            or estimate_model_memory_bytes(name, source, config.gpu.compute_type),
        )
        for name, source in config.models.items()
    }


class MemoryEstimates:
    def __init__(self, baseline: Mapping[str, ModelBudget], clock: Callable[[], float] = time.time) -> None:
        self._baseline = dict(baseline)
        self._clock = clock
        self._growth: dict[str, _Learned] = {}  # model name -> factor learned from out-of-memory errors

    def replace_baseline(self, baseline: Mapping[str, ModelBudget]) -> None:
        """A reload: a model whose source or configured figure changed starts afresh."""
        for name, budget in baseline.items():
            if self._baseline.get(name) != budget:
                self._growth.pop(name, None)
        self._baseline = dict(baseline)

    def learn_out_of_memory(self, model: str) -> int:
        """Reserve more for this model from now on; returns the new reservation."""
        now = self._clock()
        self._growth[model] = _Learned(self._growth_at(model, now) * OUT_OF_MEMORY_GROWTH, now)
        return self.memory_bytes(model)

    def _growth_at(self, model: str, now: float) -> float:
        learned = self._growth.get(model)
        return 1.0 if learned is None else decayed_growth(learned.factor, now - learned.at)

    def memory_bytes(self, model: str) -> int:
        budget = self._baseline.get(model)
        if budget is None:
            return 0
        return int(budget.memory_bytes * self._growth_at(model, self._clock()))

    def all_memory_bytes(self) -> dict[str, int]:
        return {name: self.memory_bytes(name) for name in self._baseline}
