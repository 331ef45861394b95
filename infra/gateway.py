"""The request path's front: routes a chat turn to the Ray actor that owns the context."""

from __future__ import annotations

import zlib
from typing import Any

from actors.context import ChatTurn, SendMessage


def host_index(context_id: str, hosts: int) -> int:
    """Which context host owns `context_id` (stable across restarts and processes)."""
    return zlib.crc32(context_id.encode()) % hosts


class Gateway:
    """One actor round trip per chat turn."""

    def __init__(self, hosts: list[Any]) -> None:
        if not hosts:
            raise ValueError("the gateway needs at least one context host")
        self._hosts = hosts

    async def chat(self, command: SendMessage) -> ChatTurn:
        host = self._hosts[host_index(command.context_id, len(self._hosts))]
        turn: ChatTurn = await host.send_message.remote(command)
        return turn
