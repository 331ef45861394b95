"""API keys: issue, list, rotate and revoke the caller's tenant's keys (admin scope). Each
change is an event in the log (KeyIssued, KeyRotated, KeyRevoked) that every API process
follows; the key itself is shown once, in the answer that issues it, and stored nowhere."""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from infra.http.deps import Api
from infra.http.errors import OpenAIError
from infra.http.schemas import Caller, ContextId, KeyIn, RevokeIn, RotateIn
from infra.services.keys import KeyService, UnknownKey


def _limit_ok(limit: str) -> None:
    from limits import parse_many

    if not limit:
        return
    try:
        parse_many(limit)
    except ValueError:
        raise OpenAIError(
            400, f'limit {limit!r} is not limits notation (e.g. "600/minute;10000/day")',
            "invalid_request_error", "invalid_limit", param="limit",
        ) from None  # fmt: skip


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    def service() -> KeyService:
        if api.keys is None:
            raise OpenAIError(
                404, "keys are managed through a running chat-llm (chatllm up)",
                "invalid_request_error", "keys_unavailable",
            )  # fmt: skip
        return api.keys

    def by(who: Caller) -> str:
        return who.user_id or "operator"

    def unknown(exc: UnknownKey) -> OpenAIError:
        return OpenAIError(404, str(exc), "invalid_request_error", "key_not_found")

    @app.post("/v1/admin/keys", tags=["admin"])
    async def create_key(body: KeyIn, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """Issue a key for the caller's tenant. The answer holds the key, once: the log and
        every process keep only its SHA-256."""
        keys = service()
        _limit_ok(body.limit)
        expires = body.expires_at
        if expires is not None and expires.tzinfo is None:
            raise OpenAIError(400, "expires_at needs a zone (e.g. Z)", "invalid_request_error",
                              "naive_time", param="expires_at")  # fmt: skip
        if body.expires_in_s is not None:
            expires = datetime.now(UTC) + timedelta(seconds=body.expires_in_s)
        secret, key = await keys.issue(
            who.tenant_id, body.user, by(who), name=body.name, scopes=tuple(body.scopes),
            limit=body.limit, expires_at=expires,
        )  # fmt: skip
        return {"key": secret, **keys.shown(key)}

    @app.get("/v1/admin/keys", tags=["admin"])
    async def list_keys(who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """The tenant's keys: id, user, scopes, limit, status, expiry and last use (as this
        API process saw it). Never the key, nor its hash."""
        return service().listing(who.tenant_id)

    @app.post("/v1/admin/keys/{key_id}/rotate", tags=["admin"])
    async def rotate_key(
        key_id: ContextId, who: Annotated[Caller, Depends(api.caller)], body: RotateIn | None = None
    ) -> Any:
        """Issue a successor of the key (same user, scopes, limit); the old key keeps working
        for the grace period (auth.rotation_grace_s unless `grace_s`), then gets a 401."""
        keys = service()
        try:
            secret, successor, old = await keys.rotate(
                who.tenant_id, key_id, by(who), body.grace_s if body is not None else None
            )
        except UnknownKey as exc:
            raise unknown(exc) from None
        except ValueError as exc:
            raise OpenAIError(409, str(exc), "invalid_request_error", "key_revoked") from None
        return {"key": secret, **keys.shown(successor), "rotated": keys.shown(old)}

    @app.post("/v1/admin/keys/{key_id}/revoke", tags=["admin"])
    async def revoke_key(
        key_id: ContextId, who: Annotated[Caller, Depends(api.caller)], body: RevokeIn | None = None
    ) -> Any:
        """Revoke the key: every API process refuses it within a second."""
        keys = service()
        try:
            key = await keys.revoke(
                who.tenant_id, key_id, by(who), body.reason if body is not None else ""
            )
        except UnknownKey as exc:
            raise unknown(exc) from None
        return keys.shown(key)
