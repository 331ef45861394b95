"""The direct connection from an API process to a chat shard: the hot path's one hop.

Ray places each shard, restarts it when its process dies and tells the API processes where
it listens (`ChatShard.endpoint`); the chat turns themselves cross a plain TCP connection.
A Ray actor call costs the shard ~4 ms of CPU in task machinery (issue 14's profile: 28% of
the shard's samples were the turn, the rest Ray); a frame on an open socket costs
microseconds.

One connection per API process and shard carries every turn at once (multiplexed by request
id). Each frame is a 4-byte big-endian length and a msgpack array: requests
`[id, op, body]` with op `hello` (the shard's token, first), `turn`, `stream` or `cancel`;
answers `[id, kind, body]` with kind `outcome`, `items`, `end` or `error`. The token is the
shard's own secret, handed out by Ray: whoever can connect to the port but not to Ray can
not send a turn past the API's authentication.

A connection that breaks fails the requests in flight with `ShardLinkLost` (the turn is in
the log completely or not at all; the caller says so), and the next request asks Ray for the
shard's endpoint again, waiting for its restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from actors.chat import ChatRequest, Piece, TurnOutcome
from actors.context import ContextRejected, VersionConflict
from infra.adapters.kafka.clients import LogUnavailable

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
"""The largest frame either side accepts; a longer one closes the connection."""

_STR, _PIECE, _OUTCOME = 0, 1, 2
_ERRORS: dict[str, type[Exception]] = {
    "ContextRejected": ContextRejected,
    "VersionConflict": VersionConflict,
    "LeaseLost": VersionConflict,
    "LogUnavailable": LogUnavailable,
}
"""The shard's errors that the API process answers in their own way; others are ShardFailed."""


class ShardLinkLost(ConnectionError):
    """The connection to the shard broke while a request was in flight (the shard's process
    stopped, or the network went): the turn may or may not be in the log."""


class ShardFailed(RuntimeError):
    """The shard raised an error that has no type of its own on this side."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


_encoder = msgspec.msgpack.Encoder()
_frame = msgspec.msgpack.Decoder(tuple[int, str, msgspec.Raw])
_items = msgspec.msgpack.Decoder(list[tuple[int, msgspec.Raw]])
_request = msgspec.msgpack.Decoder(ChatRequest)
_outcome = msgspec.msgpack.Decoder(TurnOutcome)
_piece = msgspec.msgpack.Decoder(Piece)
_text = msgspec.msgpack.Decoder(str)
_error = msgspec.msgpack.Decoder(tuple[str, str])


def _pack(request_id: int, kind: str, body: Any) -> bytes:
    payload = _encoder.encode((request_id, kind, body))
    return _LENGTH.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, str, msgspec.Raw] | None:
    """The next frame, or None at the end of the connection."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (size,) = _LENGTH.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes (at most {MAX_FRAME})")
        return _frame.decode(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _tagged(item: str | Piece | TurnOutcome) -> tuple[int, Any]:
    if isinstance(item, str):
        return (_STR, item)
    if isinstance(item, Piece):
        return (_PIECE, item)
    return (_OUTCOME, item)


def _untagged(tag: int, raw: msgspec.Raw) -> str | Piece | TurnOutcome:
    if tag == _STR:
        return _text.decode(raw)
    if tag == _PIECE:
        return _piece.decode(raw)
    return _outcome.decode(raw)


def _raised(body: msgspec.Raw) -> Exception:
    name, message = _error.decode(body)
    kind = _ERRORS.get(name)
    return kind(message) if kind is not None else ShardFailed(name, message)


def _forget(streams: dict[int, asyncio.Task[None]], request_id: int, _: object) -> None:
    streams.pop(request_id, None)


class ShardServer:
    """The shard's side: answers turns from the connections that show its token."""

    def __init__(
        self,
        turn: Callable[[ChatRequest], Awaitable[TurnOutcome]],
        stream: Callable[[ChatRequest], AsyncIterator[list[str | Piece | TurnOutcome]]],
    ) -> None:
        self._turn, self._stream = turn, stream
        self.token = secrets.token_hex(16)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._turns: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> tuple[str, int]:
        """Listen on `host` (an ephemeral port); returns where."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, host, 0)
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._connections.add(me)
        streams: dict[int, asyncio.Task[None]] = {}
        try:
            hello = await _read_frame(reader)
            if hello is None or hello[1] != "hello" or not self._shows_token(hello[2]):
                log.warning("refused a connection to the shard without its token")
                return
            while (frame := await _read_frame(reader)) is not None:
                request_id, op, body = frame
                if op == "cancel":
                    task = streams.get(request_id)
                    if task is not None:
                        task.cancel()
                    continue
                if op not in ("turn", "stream"):
                    raise ValueError(f"unknown operation {op!r}")
                request = _request.decode(body)
                if op == "turn":
                    # A turn runs to its end even if the caller goes: it is in the log
                    # completely or not at all, whoever waits for it.
                    turn = asyncio.create_task(self._answer(writer, request_id, request))
                    self._turns.add(turn)
                    turn.add_done_callback(self._turns.discard)
                elif op == "stream":
                    task = asyncio.create_task(self._answer_stream(writer, request_id, request))
                    streams[request_id] = task
                    task.add_done_callback(functools.partial(_forget, streams, request_id))
        except Exception as exc:  # a malformed frame: this connection ends, the shard stays
            log.warning("closed a shard connection after a bad frame: %r", exc)
        finally:
            for task in list(streams.values()):  # nobody reads them any more
                task.cancel()
            writer.close()
            self._connections.discard(me)

    def _shows_token(self, body: msgspec.Raw) -> bool:
        try:
            return hmac.compare_digest(_text.decode(body), self.token)
        except msgspec.DecodeError:
            return False

    @staticmethod
    def _send(writer: asyncio.StreamWriter, request_id: int, kind: str, body: Any) -> None:
        if not writer.is_closing():
            writer.write(_pack(request_id, kind, body))

    def _fail(self, writer: asyncio.StreamWriter, request_id: int, exc: BaseException) -> None:
        self._send(writer, request_id, "error", (type(exc).__name__, str(exc)))

    async def _answer(
        self, writer: asyncio.StreamWriter, request_id: int, request: ChatRequest
    ) -> None:
        try:
            outcome = await self._turn(request)
        except Exception as exc:
            self._fail(writer, request_id, exc)
        else:
            self._send(writer, request_id, "outcome", outcome)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _answer_stream(
        self, writer: asyncio.StreamWriter, request_id: int, request: ChatRequest
    ) -> None:
        try:
            async for batch in self._stream(request):
                self._send(writer, request_id, "items", [_tagged(i) for i in batch])
                await writer.drain()
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            return
        except Exception as exc:
            self._fail(writer, request_id, exc)
        else:
            self._send(writer, request_id, "end", None)
        with contextlib.suppress(ConnectionError):
            await writer.drain()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer = writer
        self.pending: dict[int, asyncio.Queue[tuple[str, msgspec.Raw | None]]] = {}
        self.reading = asyncio.create_task(self._read(reader))

    @property
    def open(self) -> bool:
        return not self.reading.done() and not self.writer.is_closing()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await _read_frame(reader)) is not None:
                request_id, kind, body = frame
                queue = self.pending.get(request_id)
                if queue is not None:
                    queue.put_nowait((kind, body))
        finally:
            self.writer.close()
            for queue in self.pending.values():
                queue.put_nowait(("lost", None))

    def close(self) -> None:
        self.reading.cancel()
        self.writer.close()


class ShardLink:
    """The API process's side: one multiplexed connection to one shard, found through Ray."""

    def __init__(self, endpoint: Callable[[], Awaitable[tuple[str, int, str]]]) -> None:
        """`endpoint`: asks the shard (through Ray) where it listens and for its token."""
        self._endpoint = endpoint
        self._connection: _Connection | None = None
        self._connecting: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._ids = itertools.count(1)

    async def _connect(self) -> _Connection:
        current = self._connection
        loop = asyncio.get_running_loop()
        if current is not None and current.open and current.loop is loop:
            return current
        if self._connecting is None or self._connecting[0] is not loop:
            self._connecting = (loop, asyncio.Lock())
        async with self._connecting[1]:
            current = self._connection
            if current is not None and current.open and current.loop is loop:
                return current
            if current is not None and current.loop is loop:
                current.close()
            error: Exception | None = None
            for attempt in range(3):  # a restarted shard listens elsewhere: ask Ray again
                host, port, token = await self._endpoint()
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError as exc:
                    error = exc
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                writer.write(_pack(0, "hello", token))
                self._connection = _Connection(reader, writer)
                return self._connection
            raise ShardLinkLost(f"cannot connect to the shard at {host}:{port}: {error}")

    async def _open(
        self, op: str, request: ChatRequest
    ) -> tuple[_Connection, int, asyncio.Queue[tuple[str, msgspec.Raw | None]]]:
        connection = await self._connect()
        request_id = next(self._ids)
        queue: asyncio.Queue[tuple[str, msgspec.Raw | None]] = asyncio.Queue()
        connection.pending[request_id] = queue
        connection.writer.write(_pack(request_id, op, request))
        return connection, request_id, queue

    async def turn(self, request: ChatRequest) -> TurnOutcome:
        connection, request_id, queue = await self._open("turn", request)
        try:
            kind, body = await queue.get()
        finally:
            connection.pending.pop(request_id, None)
        if kind == "outcome":
            assert body is not None
            return _outcome.decode(body)
        if kind == "error":
            assert body is not None
            raise _raised(body)
        raise ShardLinkLost("the connection to the chat shard broke during the turn")

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Piece | TurnOutcome]:
        connection, request_id, queue = await self._open("stream", request)
        finished = False
        try:
            while True:
                kind, body = await queue.get()
                if kind == "items":
                    assert body is not None
                    for tag, raw in _items.decode(body):
                        yield _untagged(tag, raw)
                elif kind == "end":
                    finished = True
                    return
                elif kind == "error":
                    finished = True
                    assert body is not None
                    raise _raised(body)
                else:
                    finished = True
                    raise ShardLinkLost("the connection to the chat shard broke during the turn")
        finally:
            connection.pending.pop(request_id, None)
            if not finished and connection.open:  # the reader went: the shard stops the turn
                connection.writer.write(_pack(request_id, "cancel", None))

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
