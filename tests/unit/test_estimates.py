"""GPU memory reservations: the baseline from the configuration, what out-of-memory errors teach, and what a
reload keeps of it."""

from __future__ import annotations

import pytest

from whisperd.config import Config, GpuConfig, TranscribeConfig
from whisperd.estimates import MemoryEstimates, ModelBudget, baseline_from_config

GIB = 1024**3


def config(
    models: dict[str, str], overrides: dict[str, int] | None = None, compute: str = "float16"
) -> Config:
    return Config(
        models=models,
        transcribe=TranscribeConfig(default_model=next(iter(models))),
        gpu=GpuConfig(compute_type=compute, model_memory_bytes=overrides or {}),
    )


@pytest.mark.parametrize(
    ("models", "overrides", "compute", "expected_gib"),
    [
        ({"tiny.en": "bundled:tiny.en"}, {}, "float16", {"tiny.en": 0.5}),
        ({"big": "large-v3"}, {}, "float16", {"big": 4.5}),
        ({"big": "large-v3"}, {}, "int8_float16", {"big": 2.9}),
        ({"mine": "/srv/models/custom"}, {}, "float16", {"mine": 5.0}),
        ({"mine": "/srv/models/custom"}, {"mine": 3 * GIB}, "float16", {"mine": 3.0}),
    ],
    ids=["tiny", "large-v3-fp16", "large-v3-int8", "unknown-safe-default", "configured"],
)
def test_baseline_from_config(
    models: dict[str, str], overrides: dict[str, int], compute: str, expected_gib: dict[str, float]
) -> None:
    got = MemoryEstimates(baseline_from_config(config(models, overrides, compute))).all_memory_bytes()
    assert {name: round(b / GIB, 1) for name, b in got.items()} == expected_gib


def test_each_out_of_memory_error_raises_that_model_only() -> None:
    estimates = MemoryEstimates({"a": ModelBudget("tiny", 4 * GIB), "b": ModelBudget("small", GIB)})
    assert estimates.learn_out_of_memory("a") == 5 * GIB
    assert estimates.learn_out_of_memory("a") == int(4 * GIB * 1.25 * 1.25)
    assert estimates.memory_bytes("b") == GIB
    assert estimates.memory_bytes("unknown") == 0


@pytest.mark.parametrize(
    ("after_reload", "expected_bytes"),
    [
        (ModelBudget("tiny", 4 * GIB), 5 * GIB),  # nothing changed: what was learned stays
        (ModelBudget("large-v3", 8 * GIB), 8 * GIB),  # a new model under the old name starts afresh
        (ModelBudget("tiny", 2 * GIB), 2 * GIB),  # the admin set a new figure: it wins
    ],
    ids=["unchanged-keeps-learned", "new-source-starts-afresh", "new-figure-starts-afresh"],
)
def test_a_reload_replaces_the_baseline_and_keeps_only_what_still_applies(
    after_reload: ModelBudget, expected_bytes: int
) -> None:
    estimates = MemoryEstimates({"m": ModelBudget("tiny", 4 * GIB), "other": ModelBudget("base", GIB)})
    estimates.learn_out_of_memory("m")
    estimates.learn_out_of_memory("other")
    estimates.replace_baseline({"m": after_reload, "other": ModelBudget("base", GIB)})
    assert estimates.memory_bytes("m") == expected_bytes
    assert estimates.memory_bytes("other") == int(GIB * 1.25)


def test_renaming_a_model_to_a_bigger_one_reserves_the_bigger_ones_memory() -> None:
    """The bug a reload used to have: the small model's figure stuck to the name."""
    estimates = MemoryEstimates(baseline_from_config(config({"fast": "tiny.en"})))
    estimates.replace_baseline(baseline_from_config(config({"fast": "large-v3"})))
    assert estimates.memory_bytes("fast") == int(4.5 * GIB)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


HOUR = 3600.0


@pytest.mark.parametrize(
    ("steps", "expected_gib"),
    [
        # (seconds to wait, then an out-of-memory error or not) ... -> the reservation at the end
        ([(0, True)], 5.0),  # 4 GiB * 1.25
        ([(0, True), (HOUR - 1, False)], 5.0),  # within the hour: all of what was learned
        ([(0, True), (HOUR, False)], 4.5),  # an hour without errors: the excess (1 GiB) halved
        ([(0, True), (2 * HOUR, False)], 4.25),
        ([(0, True), (3 * HOUR + 1, False)], 4.125),
        ([(0, True), (100 * HOUR, False)], 4.0),  # back to the baseline
        ([(0, True), (0, True)], 6.25),  # 4 * 1.25 * 1.25
        ([(0, True), (HOUR, True)], 5.625),  # 4.5 GiB when the second error came, * 1.25
        ([(0, True), (HOUR, True), (HOUR, False)], 4.8125),  # the excess 1.625 halved, from the last error
        ([(0, True), (-HOUR, False)], 5.0),  # a clock set back decays nothing
    ],
    ids=[
        "learned",
        "hour-not-yet",
        "one-hour",
        "two-hours",
        "three-hours",
        "forgotten",
        "two-errors",
        "error-after-decay",
        "decay-from-last-error",
        "clock-set-back",
    ],
)
def test_what_out_of_memory_errors_taught_halves_every_hour_without_errors(
    steps: list[tuple[float, bool]], expected_gib: float
) -> None:
    clock = Clock()
    estimates = MemoryEstimates({"m": ModelBudget("tiny", 4 * GIB), "other": ModelBudget("base", GIB)}, clock)
    for wait_s, out_of_memory in steps:
        clock.now += wait_s
        if out_of_memory:
            estimates.learn_out_of_memory("m")
    assert estimates.memory_bytes("m") / GIB == pytest.approx(expected_gib)
    assert estimates.memory_bytes("other") == GIB, "only the model that ran out of memory"
