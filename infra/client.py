"""The Python API: a small client of chat-llm's OpenAI-compatible HTTP API.

Any OpenAI SDK works too (base_url=http://host:port/v1); this client adds the
chat-llm extras: stateful contexts (X-Context-Id) and the fallback flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class ChatError(RuntimeError):
    """The service refused or failed the request; the message says why."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        """`status` is the HTTP status, or 0 when the service could not be reached at all."""
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Reply:
    content: str
    context_id: str
    model: str
    fallback: bool
    raw: dict[str, Any]


class ChatClient:
    """Talks to a running chat-llm."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        user: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        headers = {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if tenant:
            headers["X-Tenant-Id"] = tenant
        self._user = user
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def chat(self, message: str, *, context: str | None = None, model: str = "") -> Reply:
        """One turn. With `context`, the service keeps the conversation; without, it starts one."""
        headers = {"X-Context-Id": context} if context else {}
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": message}]}
        if self._user:
            body["user"] = self._user
        try:
            response = self._http.post("/v1/chat/completions", json=body, headers=headers)
        except httpx.TransportError as exc:
            raise ChatError(
                0,
                f"cannot reach chat-llm at {self._http.base_url}: {exc} (is `chatllm up` running?)",
            ) from None
        data = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        if response.status_code != 200:
            message_text = (
                (data.get("error") or {}).get("message") or data.get("detail") or response.text
            )
            retry = response.headers.get("retry-after")
            raise ChatError(
                response.status_code, str(message_text), float(retry) if retry else None
            )
        extra = data.get("chatllm", {})
        return Reply(
            content=data["choices"][0]["message"]["content"],
            context_id=response.headers.get("x-context-id", extra.get("context_id", "")),
            model=data.get("model", ""),
            fallback=bool(extra.get("fallback", False)),
            raw=data,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
