"""Every route of the API is either public or has its scope in infra/http/security.py: a new
route cannot be forgotten (it would need `admin`, and this test says so)."""

from __future__ import annotations

from typing import Any

from infra.config import load_config
from infra.http.app import build_api
from infra.http.security import PUBLIC, ROUTE_SCOPES
from infra.services.workflows import Catalog


class _Unused:
    """Stands in for the collaborators: building the routes calls none of them."""

    models = ("demo-1",)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"building the API called {name}")


def test_every_route_is_public_or_has_a_scope() -> None:
    api = build_api(
        gateway=_Unused(),
        store=_Unused(),  # type: ignore[arg-type]
        settings=load_config(env={}).settings,
        archive_stats=lambda: (0, 0),
        workflows=Catalog(),
        knowledge=_Unused(),  # type: ignore[arg-type]
    )
    routes = {
        (method, route.path)
        for route in api.routes
        for method in getattr(route, "methods", set()) - {"HEAD"}
    }
    unlisted = sorted(r for r in routes if r[1] not in PUBLIC and r not in ROUTE_SCOPES)
    assert unlisted == [], f"routes without a scope (they need admin): {unlisted}"
    stale = sorted(set(ROUTE_SCOPES) - routes)
    assert stale == [], f"scopes of routes that do not exist: {stale}"
