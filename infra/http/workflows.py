"""Workflows over HTTP: list the definitions, start a run, read a run and its events, the
per-step metrics. A run is started by appending its WorkflowStarted event; the runner
(in `chatllm up` or any `chatllm worker`) drives it from the log."""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Path, Query
from pydantic import BaseModel, Field

from actors.workflow import WorkflowError, order, summary
from infra.adapters.clickhouse.store import AsyncStore
from infra.services.workflows import Appender, Catalog, read_run, start_run

RunId = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$", description="a run id (UUIDv7)")]
WorkflowName = Annotated[str, Path(max_length=64)]


class RunIn(BaseModel):
    inputs: dict[str, Any] = Field(default_factory=dict, description="checked against `inputs`")


def listing(catalog: Catalog, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The catalog's workflows with their step metrics (what `GET /v1/workflows` answers,
    and `chatllm workflow list` shows without a running service)."""
    return {
        "workflows": [
            {
                "name": name,
                "description": d.spec.description,
                "version": d.spec.version,
                "source": d.source,
                "steps": order(d.spec),
                "inputs": msgspec.to_builtins(d.spec.inputs),
                "metrics": [m for m in metrics if m["workflow"] == name],
            }
            for name, d in catalog.definitions().items()
        ],
        "errors": catalog.errors,
    }


def add_workflow_routes(
    api: FastAPI,
    caller: Callable[..., Awaitable[Any]],
    store: AsyncStore,
    catalog: Catalog,
    log_sink: Appender | None,
) -> None:
    Who = Annotated[Any, Depends(caller)]

    @api.get("/v1/workflows", tags=["workflows"])
    async def workflows(who: Who) -> dict[str, Any]:
        """The workflows this service knows (and files that failed to load, with why), with
        each one's run counts and per-step metrics."""
        return listing(catalog, await store.call_with(lambda s: s.workflow_metrics(who.tenant_id)))

    @api.post("/v1/workflows/{name}/runs", status_code=202, tags=["workflows"])
    async def run(name: WorkflowName, body: RunIn, who: Who) -> dict[str, Any]:
        """Start a run (202: the runner takes it from the log); 404 for an unknown workflow,
        422 for inputs that do not fit its schema."""
        if log_sink is None:
            raise HTTPException(503, "this service cannot start runs (no event log)")
        try:
            spec = catalog.get(name)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        try:
            run_id = await start_run(
                log_sink, spec, body.inputs, tenant_id=who.tenant_id, user_id=who.user_id or "api"
            )
        except WorkflowError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"run_id": run_id, "workflow": name, "status": "started"}

    @api.get("/v1/workflows/runs", tags=["workflows"])
    async def runs(
        who: Who,
        workflow: Annotated[str, Query(max_length=64)] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[dict[str, Any]]:
        """The newest runs, from the analytics projection."""
        found = await store.call_with(lambda s: s.workflow_runs(who.tenant_id, workflow, limit))
        return [{**r, "started_at": r["started_at"].isoformat()} for r in found]

    @api.get("/v1/workflows/runs/{run_id}", tags=["workflows"])
    async def run_status(
        run_id: RunId, who: Who, events: Annotated[bool, Query()] = False
    ) -> dict[str, Any]:
        """A run folded from its archived events (a second behind the log at most), and,
        with `events=true`, the events themselves."""
        state, log = await read_run(store, who.tenant_id, run_id)
        if state is None:
            raise HTTPException(404, f"no run {run_id} (yet: a new run is archived within ~1 s)")
        found = summary(state)
        if events:
            found["events"] = [msgspec.to_builtins(e) for e in log]
        return found
