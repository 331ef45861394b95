"""Every OpenAI chat-completions parameter is honoured, forwarded or refused by name: the
checked-in list (docs/openai-chat-parameters.txt) against the SDK's, and each parameter
against the request model (infra/http/app.py)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from infra.http.schemas import OPENAI_PARAMETERS, CompletionIn

LISTED = [
    line.strip()
    for line in (Path(__file__).parents[2] / "docs/openai-chat-parameters.txt")
    .read_text()
    .split("\n")
    if line.strip() and not line.startswith("#")
]
BASE: dict[str, Any] = {"model": "demo-1", "messages": [{"role": "user", "content": "hi"}]}

# A value each parameter might be sent with, that chat-llm cannot honour when refused.
SENT: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "frequency_penalty": 0.5,
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "max_completion_tokens": 5,
    "max_tokens": 5,
    "metadata": {"k": "v"},
    "modalities": ["text", "audio"],
    "moderation": {"mode": "strict"},
    "n": 2,
    "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "x"},
    "presence_penalty": -0.5,
    "prompt_cache_key": "k1",
    "prompt_cache_options": {"mode": "x"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "response_format": {"type": "json_object"},
    "safety_identifier": "s-1",
    "seed": 7,
    "service_tier": "flex",
    "stop": ["END"],
    "store": True,
    "stream_options": {"include_usage": True},
    "temperature": 1.5,
    "tool_choice": "required",
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "top_logprobs": 2,
    "top_p": 0.5,
    "user": "alice@example.com",
    "verbosity": "low",
    "web_search_options": {},
}


def test_the_checked_in_list_is_the_sdks() -> None:
    from openai.types.chat import completion_create_params as params

    sdk = set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}
    assert sorted(sdk) == LISTED, "update docs/openai-chat-parameters.txt and OPENAI_PARAMETERS"


@pytest.mark.parametrize("name", LISTED)
def test_each_parameter_has_a_field_and_a_stated_handling(name: str) -> None:
    assert name in CompletionIn.model_fields
    assert name in OPENAI_PARAMETERS


@pytest.mark.parametrize("name", sorted(SENT))
def test_each_parameter_is_honoured_forwarded_or_refused_by_name(name: str) -> None:
    handling = OPENAI_PARAMETERS[name]
    body = {**BASE, name: SENT[name]}
    if name == "stream_options":
        body["stream"] = True
    if name in ("tool_choice", "parallel_tool_calls"):
        body["tools"] = SENT["tools"]  # each needs tools
    if name == "top_logprobs":
        body["logprobs"] = True
    request = CompletionIn.model_validate(body)
    refused = request.refusal()
    if handling.startswith("refused"):
        assert refused is not None and refused[0] == name, (name, refused)
        return
    assert refused is None, (name, refused)
    options = request.options()
    if handling.startswith("forwarded") or name in ("max_tokens", "stop", "user"):
        carried = getattr(options, "max_tokens" if name.startswith("max_") else name)
        assert carried not in (None, ()), name


def test_an_unknown_parameter_and_out_of_range_values_are_refused() -> None:
    for bad in (
        {"temperature": 2.5},
        {"temperature": -1},
        {"presence_penalty": 5},
        {"n": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"top_logprobs": 21},
        {"not_a_parameter": 1},
    ):
        with pytest.raises(ValidationError) as caught:
            CompletionIn.model_validate({**BASE, **bad})
        assert str(caught.value.errors()[0]["loc"][0]) == next(iter(bad))


def test_content_parts_are_text_or_refused() -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    ok = CompletionIn.model_validate({**BASE, "messages": [{"role": "user", "content": parts}]})
    assert ok.refusal() is None and ok.text_of(ok.messages[0]) == "Hello\nworld"
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    refused = CompletionIn.model_validate(
        {**BASE, "messages": [{"role": "user", "content": image}]}
    ).refusal()
    assert refused == ("messages[0].content[0]", "'image_url' parts are not supported")
