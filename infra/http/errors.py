"""Errors in OpenAI's shape: the exception routes raise, what a failed turn or a lost shard
becomes, and the handlers that answer every error alike."""

import logging

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.chat import TurnOutcome
from actors.context import (
    ContextRejected,
    VersionConflict,
)
from infra.adapters.kafka.clients import LogUnavailable
from infra.http.queries import QueryError
from infra.ray.shardlink import ShardLinkLost

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers or {}
        self.param = param


def outcome_error(outcome: TurnOutcome) -> OpenAIError | None:
    """The HTTP error of a turn that did not produce a reply (None if it did)."""
    if outcome.status == "ok":
        return None
    if outcome.status == "denied":
        return OpenAIError(
            429,
            f"{outcome.detail}; retry after {outcome.retry_after_s:g}s",
            "rate_limit_error",
            "rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(outcome.retry_after_s + 0.499)))},
        )
    if outcome.status == "blocked":
        return OpenAIError(
            400, f"message rejected: {outcome.detail}", "invalid_request_error", "input_rejected"
        )
    if outcome.error_class == "content_policy":
        return OpenAIError(400, outcome.detail, "invalid_request_error", "content_policy_violation")
    if outcome.error_class == "context_too_long":
        return OpenAIError(400, outcome.detail, "invalid_request_error", "context_length_exceeded")
    return OpenAIError(
        502,
        f"the model failed ({outcome.error_class}): {outcome.detail}",
        "api_error",
        outcome.error_class,
    )


def own_message(exc: Exception) -> str:
    """A domain error's own message (Ray's re-raised copy prints its traceback instead)."""
    return str(getattr(exc, "cause", None) or exc)


def as_http(exc: Exception) -> Exception:
    """Domain errors from the actor (Ray re-raises them as themselves) to HTTP errors. The
    message is the domain error's own: never Ray's traceback (pids, addresses, code)."""
    own = own_message(exc)
    if isinstance(exc, ContextRejected):
        return OpenAIError(403, own, "permission_error", "context_forbidden")
    if isinstance(exc, VersionConflict):
        return OpenAIError(
            409, f"concurrent writer on this context: {own}", "api_error", "version_conflict"
        )
    cause = exc if isinstance(exc, LogUnavailable) else getattr(exc, "cause", None)
    if isinstance(cause, LogUnavailable):
        return cause
    if isinstance(exc, ShardLinkLost) or type(exc).__name__ in (
        "ActorDiedError",
        "ActorUnavailableError",
        "RayActorError",
    ):
        log.warning("chat shard stopped during a request: %s", type(exc).__name__)
        return OpenAIError(
            503,
            "the chat shard stopped during the request (Ray restarts it). A turn is recorded"
            " completely or not at all: check the context's events before retrying.",
            "api_error",
            "shard_restarting",
            headers={"Retry-After": "2"},
        )
    log.error("chat turn failed: %r", exc)
    return OpenAIError(
        503, f"the chat shard failed: {type(exc).__name__}", "api_error", "shard_unavailable"
    )


def error_event(message: str, type_: str, code: str | None) -> str:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return f"data: {msgspec.json.encode(body).decode()}\n\n"


def install_error_handlers(api: FastAPI) -> None:
    """Every error, whatever raised it, in OpenAI's shape."""

    @api.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        # OpenAI's shape, plus FastAPI's usual `detail` for clients of the non-OpenAI routes.
        error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
        return JSONResponse(
            {"error": error, "detail": exc.message}, exc.status, headers=exc.headers
        )

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Every route answers a bad request in OpenAI's shape (400), never FastAPI's
        # 422 with a list: the first problem names where it is.
        problems = exc.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"invalid request: {where}: {first.get('msg', '')}"
            if where
            else (f"invalid request: {first.get('msg', '')}")
        )
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        param = str(first["loc"][-1]) if first.get("loc") else None
        error = {"message": message, "type": "invalid_request_error", "param": param,
                 "code": "invalid_request"}  # fmt: skip
        return JSONResponse({"error": error, "detail": message}, 400)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(exc.status_code)  # fmt: skip
        kind = kind or ("invalid_request_error" if exc.status_code < 500 else "api_error")
        error = {"message": message, "type": kind, "param": None, "code": None}
        return JSONResponse(
            {"error": error, "detail": message}, exc.status_code, headers=exc.headers
        )

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not the caller's fault: a 500 in OpenAI's shape, the details in the log only.
        log.error("unexpected error: %r", exc, exc_info=exc)
        message = "internal error: the service failed to answer (details are in its log)"
        error = {"message": message, "type": "api_error", "param": None, "code": "internal_error"}
        return JSONResponse({"error": error, "detail": message}, 500)

    @api.exception_handler(QueryError)
    async def _bad_query(_: Request, exc: QueryError) -> JSONResponse:
        error = {"message": str(exc), "type": "invalid_request_error", "param": None}
        return JSONResponse({"error": {**error, "code": "invalid_query"}, "detail": str(exc)}, 400)

    @api.exception_handler(LogUnavailable)
    async def _log_down(_: Request, exc: LogUnavailable) -> JSONResponse:
        message = f"event log unavailable, nothing was recorded: {exc}"
        return JSONResponse(
            {
                "detail": message,
                "error": {
                    "message": message,
                    "type": "api_error",
                    "param": None,
                    "code": "log_unavailable",
                },
            },
            503,
        )
