"""Operations: Prometheus metrics, health, and the models (OpenAI's list and retrieve)."""

from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from infra.http.deps import Api
from infra.http.schemas import Health


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        """Prometheus text exposition: turns (summed over the API processes), turn latency,
        projection lag, archive counts. X-ChatLLM-API-Process: which process answered. With
        auth.required it needs a `query` key, unless http.metrics_public."""
        if not api.settings.http.metrics_public:
            await api.caller(request, authorization)
        if api.metrics is None:
            raise HTTPException(404, "metrics are not enabled")
        text = api.metrics.exposition()
        if api.more_metrics is not None:  # the projections' own, from the process that runs them
            text += await api.more_metrics()
        return Response(
            text,
            media_type=CONTENT_TYPE_LATEST,
            headers={"X-ChatLLM-API-Process": str(api.api_process)},
        )

    @app.get("/healthz", response_model=Health)
    async def health() -> Health:
        """Liveness, and every consumer of the log with its lag: `degraded` names the stuck."""
        if api.health_report is not None:
            return Health.model_validate(await api.health_report())
        written, dead = api.archive_stats()
        return Health(status="ok", archived=written, dead_lettered=dead)

    def model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "chat-llm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The models the router can send requests to (OpenAI's list shape); `auto` lets the
        router choose."""
        return {"object": "list", "data": [model_entry(m) for m in api.known_models()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        """One model (the OpenAI SDK's models.retrieve)."""
        if model_id not in api.known_models():
            raise api.model_not_found(model_id)
        return model_entry(model_id)
