"""The shipped etc/whisperd.toml documents every setting with its default, and nothing else."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from whisperd.config import Config, parse_config

KeyPath = tuple[str, ...]
SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "whisperd.toml"


def _setting_paths(struct_type: type[msgspec.Struct], prefix: KeyPath = ()) -> Iterator[KeyPath]:
    """Every field of the Config tree as a key path, e.g. ("scheduler", "max_retries"); sections included."""
    for field in msgspec.structs.fields(struct_type):
        path = (*prefix, field.encode_name)
        yield path
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from _setting_paths(field.type, path)


def _lookup(table: dict[str, Any], path: KeyPath) -> bool:
    node: Any = table
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@pytest.fixture(scope="module")
def text() -> str:
    return SHIPPED.read_text()


def test_shipped_config_is_exactly_the_defaults(text: str) -> None:
    assert parse_config(text, str(SHIPPED)) == Config()


@pytest.mark.parametrize("path", list(_setting_paths(Config)), ids=".".join)
def test_every_setting_is_documented(text: str, path: KeyPath) -> None:
    assert _lookup(tomllib.loads(text), path), f"{'.'.join(path)} is missing from {SHIPPED}"


def test_the_walk_reaches_every_section() -> None:
    paths = set(_setting_paths(Config))
    assert {("daemon",), ("scheduler",), ("workers",), ("gpu",), ("transcribe",), ("models",)} <= paths
    assert ("scheduler", "max_retries") in paths
    assert ("gpu", "model_memory_bytes") in paths  # a dict-typed setting: its key must be written, even if {}
