"""Hostile input, property-based (hypothesis): whatever bytes, documents or text arrive, the
event decoder, the config loader and the sanitizer answer with their own clear error or a
valid result, never with a crash of another kind."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.sanitizer import Sanitizer, SanitizerPolicy
from events import DecodeError, decode, encode
from infra.config import _DEFAULTS, ConfigError, load_config
from tests.factories import make_event

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=2000))
def test_any_bytes_decode_to_an_event_or_a_decode_error(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError as exc:
        assert exc.reason


@FAST
@given(st.sampled_from(sorted(json.loads(encode(make_event())))), JSON)
def test_a_valid_event_with_one_field_replaced_decodes_or_says_why(field: str, value: Any) -> None:
    document = json.loads(encode(make_event()))
    document[field] = value
    try:
        event = decode(json.dumps(document).encode())
    except DecodeError as exc:
        assert exc.reason
    else:  # accepted: then it is a whole, valid event
        assert decode(encode(event)) == event


@FAST
@given(st.dictionaries(st.sampled_from(sorted(_DEFAULTS)), JSON, max_size=5))
def test_any_config_values_load_or_say_which_key_is_wrong(values: dict[str, Any]) -> None:
    document: dict[str, Any] = {}
    for dotted, value in values.items():
        node = document
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.toml"
        path.write_text(_toml(document))
        try:
            load_config(path, env={})
        except ConfigError as exc:
            # The README: "a bad value fails at start with the key, its source and the reason".
            assert KEY_SOURCE_REASON.search(str(exc)), str(exc)


KEY = r"""(?:'[^']*'|"[^"]*")"""  # a key as repr() quotes it
KEY_SOURCE_REASON = re.compile(
    rf"invalid config key {KEY} \(from [^)]+\): \S"  # the key, its source, the reason
    rf"|unknown config key {KEY} \(from [^)]+\)"  # the reason is that it is unknown
    r"|config file '[^']+' is not valid TOML: \S"  # no key to name: the file and where
)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[limits]\nuser = "abc"\n', "limits.user"),
        ('[limits]\ntenant = "5 per fortnight"\n', "limits.tenant"),
        ('[sanitizer]\nblock_patterns = ["("]\n', "sanitizer.block_patterns"),
        (
            '[[routing.bands]]\nname = "a"\nmax_complexity = 0.5\nmodel = "demo-1"\n',
            "routing.bands",
        ),
        ('[clickhouse]\nurl = "ch.internal:8123"\n', "clickhouse.url"),
        ('[tracing]\notlp_endpoint = "localhost"\n', "tracing.otlp_endpoint"),
    ],
)
def test_a_value_parsed_later_fails_at_start_naming_its_key(
    toml: str, key: str, tmp_path: Path
) -> None:
    path = tmp_path / "chatllm.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    message = str(raised.value)
    assert f"config key '{key}' (from file {path})" in message, message


def _toml(document: dict[str, Any]) -> str:
    """TOML through JSON values (TOML has no null: such a key is left out)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix and plain:
            lines.append(f"[{prefix}]")
        for key, value in plain.items():
            if value is not None and _tomlable(value):
                lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
        for key, value in table.items():
            if isinstance(value, dict):
                emit(value, f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key))

    emit(document, "")
    return "\n".join(lines) + "\n"


def _tomlable(value: Any) -> bool:
    if value is None or isinstance(value, dict):
        return False
    if isinstance(value, list):
        return all(_tomlable(v) for v in value)
    return not (isinstance(value, float) and value in (float("inf"), float("-inf")))


@FAST
@given(st.text(max_size=5000))
def test_the_sanitizer_answers_any_text_with_a_verdict_and_clean_text(text: str) -> None:
    sanitizer = Sanitizer(SanitizerPolicy(max_chars=1000, block_patterns=("forbidden",)))
    verdict = sanitizer.check(text)
    assert isinstance(verdict.allowed, bool) and isinstance(verdict.reasons, tuple)
    if verdict.allowed:
        assert len(verdict.text) <= 1000
        assert all(c in "\n\t" or ord(c) >= 32 for c in verdict.text)
