"""Operators: audit verification, config profiles, forgetting a user, what-if replays and
projection rebuilds."""

import asyncio
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse

from actors.whatif import WHATIF_TYPES, WhatIfPolicy, whatif
from events import ProjectionsRebuilt, UserForgotten, decode
from infra.adapters.clickhouse.reads import EventFilter
from infra.adapters.clickhouse.store import ClickHouseStore
from infra.config import ConfigError
from infra.http.deps import Api
from infra.http.errors import as_http
from infra.http.queries import QueryError, check_moments
from infra.http.schemas import Caller, ForgetIn, ProfileIn, RebuildIn, WhatIfIn
from infra.services.audit import verify
from infra.services.rebuild import BrokerSource, RebuildError, RebuildJob


def add_routes(app: FastAPI, api: Api) -> None:
    """Add the routes to the app, bound to the API's collaborators."""

    background: set[asyncio.Task[None]] = set()
    local_rebuilds: dict[str, RebuildJob] = {}

    @app.get("/v1/audit/verify", tags=["audit"])
    async def audit_verify(
        who: Annotated[Caller, Depends(api.caller)],
        context: Annotated[str, Query(max_length=256, description="one stream only")] = "",
    ) -> Any:
        """Check the caller's tenant's archived streams against their hash chains: every
        altered, removed or reordered event is named (`ok` is false then)."""
        await api.archived_so_far()
        return await api.store.call_with(lambda s: verify(s, who.tenant_id, context))

    @app.post("/v1/admin/config", tags=["admin"])
    async def switch_config(body: ProfileIn, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """Switch the running service to another profile of its config file (empty: the
        file alone). Live keys take effect now; the answer lists those that need a restart.
        The change is recorded as a ConfigChanged event (who, before, after)."""
        if api.use_profile is None:
            raise HTTPException(503, "this service cannot switch its configuration")
        try:
            return await api.use_profile(body.profile, who.tenant_id, who.user_id or "operator")
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/v1/admin/forget", tags=["admin"])
    async def forget_user(body: ForgetIn, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """Erase a user's content from the archive and every projection of the caller's
        tenant (a data-protection request). The audit chain still verifies; the erasure is
        itself recorded as a UserForgotten event."""
        erased = await api.store.call_with(lambda s: s.forget_user(who.tenant_id, body.user_id))
        # The live state too: the shard's contexts (transcripts, titles) and its cache.
        try:
            await api.gateway.forget(who.tenant_id, body.user_id)
        except Exception as exc:
            raise as_http(exc) from None
        await api.record_admin(
            who,
            UserForgotten(
                user_id=body.user_id, events=erased, requested_by=who.user_id or "operator"
            ),
        )
        return {"user_id": body.user_id, "erased_events": erased}

    @app.post("/v1/whatif", tags=["replay"])
    async def what_if(body: WhatIfIn, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """Re-run the caller's tenant's recorded requests under another policy (limits,
        routing, deployments with prices) without calling any model; recorded and
        counterfactual side by side. Deterministic."""
        check_moments(body.since, body.until)
        try:
            policy = msgspec.convert(body.policy, WhatIfPolicy)
        except msgspec.ValidationError as exc:
            raise QueryError(f"invalid policy: {exc}") from None
        if not policy.deployments:
            policy = msgspec.structs.replace(policy, deployments=list(api.settings.deployments))
        if problems := policy.problems():
            raise QueryError("invalid policy: " + "; ".join(problems))
        where = EventFilter(
            tenant_id=who.tenant_id, types=WHATIF_TYPES, since=body.since, until=body.until
        )
        events = [decode(r.body.encode()) async for page in api.store.search(where) for r in page]
        report = whatif(events, policy, api.settings.deployments)
        empty = {"requests": 0}
        return report.get(who.tenant_id, {"recorded": empty, "whatif": empty, "changed": {}})

    async def rebuild_call(method: str, *args: Any) -> Any:
        """Rebuilds run where the store is: in the store host (an actor) when there is one,
        else in this process."""
        if api.rebuilds is not None:
            try:
                return await getattr(api.rebuilds, method).remote(*args)
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, Exception) else exc) from None
        if method == "rebuild_status":
            job = local_rebuilds.get(args[0])
            return None if job is None else job.status()
        if any(job.state == "running" for job in local_rebuilds.values()):
            raise RuntimeError("a rebuild is already running")
        projections, since, until, source = args
        job = RebuildJob(
            lambda: ClickHouseStore(api.settings.clickhouse).open(),
            projections,
            since,
            until,
            source=source,
            broker=BrokerSource(api.bootstrap_servers, api.settings.topics.events)
            if api.bootstrap_servers
            else None,
        ).start()
        local_rebuilds[job.job_id] = job
        return job.status()

    @app.post("/v1/admin/rebuild", tags=["admin"])
    async def start_rebuild(body: RebuildIn, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """Rebuild projections from the archive into shadow tables and swap them in
        atomically; the service keeps serving. Returns a job to poll (one at a time)."""
        check_moments(body.since, body.until)
        try:
            status = await rebuild_call(
                "rebuild_start", list(body.projections), body.since, body.until, body.source
            )
        except RebuildError as exc:
            raise QueryError(str(exc)) from None
        except RuntimeError as exc:
            raise HTTPException(409, str(exc)) from None
        job_id = status["job_id"]

        async def record_when_done() -> None:
            while True:
                found = await rebuild_call("rebuild_status", job_id)
                if found is None or found["state"] != "running":
                    break
                await asyncio.sleep(0.5)
            if found is not None and found["report"] is not None:
                await api.record_admin(
                    who,
                    ProjectionsRebuilt(
                        projections=tuple(body.projections),
                        events=found["report"]["events"],
                        since=body.since,
                        until=body.until,
                        requested_by=who.user_id or "operator",
                    ),
                )

        background.add(task := asyncio.create_task(record_when_done()))
        task.add_done_callback(background.discard)
        return JSONResponse(status, 202)

    @app.get("/v1/admin/rebuild/{job_id}", tags=["admin"])
    async def rebuild_status(job_id: str, who: Annotated[Caller, Depends(api.caller)]) -> Any:
        """A rebuild's progress: done/total events, rate, ETA, and its report when done."""
        found = await rebuild_call("rebuild_status", job_id)
        if found is None:
            raise HTTPException(404, f"no rebuild {job_id!r}")
        return found
