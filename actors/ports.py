"""What the actors call out to. Adapters live in infra/."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import msgspec

from events import Envelope, ToolCall


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a conversation as the model sees it."""

    role: str
    content: str
    message_id: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant message: the function calls it asked for."""
    tool_call_id: str = ""
    """A `tool` message: the call whose result it is."""


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A model's whole answer."""

    content: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: list[dict[str, Any]] | None = None


class StreamEnd(msgspec.Struct, frozen=True, kw_only=True):
    """The last item of a provider's stream, when the provider says why it ended and what it
    used (OpenAI's finish_reason and its usage chunk). Providers that know neither yield
    only text."""

    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    """The function calls the model asked for, whole (a stream's deltas put together)."""
    logprobs: list[dict[str, Any]] | None = None
    """OpenAI's logprobs.content of the whole answer, when asked for and given."""


class ModelError(Exception):
    """A model call failed; `error_class` is one of the classes routing reacts to."""

    def __init__(self, error_class: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the fields across Ray's pickling
        return (ModelError, (self.error_class, self.message, self.retry_after_s))


class ModelProvider(Protocol):
    """A language model behind some API. `options` (actors.chat.GenerationOptions) carries
    what the caller asked of the generation; a provider forwards what its API takes."""

    name: str

    async def complete(self, messages: Sequence[ChatMessage], options: Any = None) -> Completion:
        """Answer the conversation; raise ModelError on a classified failure."""
        ...

    def stream(
        self, messages: Sequence[ChatMessage], options: Any = None
    ) -> AsyncGenerator[str | StreamEnd, None]:
        """Answer the conversation piece by piece (text), then optionally a StreamEnd; raise
        ModelError on a classified failure. A conversation that ends with an assistant
        message asks the model to continue that message (a prefill)."""
        ...


class SentimentScorer(Protocol):
    """Scores a text's sentiment."""

    name: str

    def score(self, text: str) -> float:
        """A compound score in -1..1."""
        ...


class EventSink(Protocol):
    """Appends events to the log; returns only once the log has acknowledged all of them."""

    async def append(self, events: Sequence[Envelope[Any]]) -> None:
        """Durably append `events` (in order per stream) or raise."""
        ...


class StreamReader(Protocol):
    """Reads one stream's events back from the log, in stream order."""

    async def read_stream(self, stream_id: str) -> list[Envelope[Any]]:
        """Every event of `stream_id` that the log holds."""
        ...
