"""Hostile input at the HTTP API: schemathesis generates requests from the OpenAPI spec (in
and out of schema) against the running service. Must hold: no 5xx, and every 4xx says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.e2e.conftest import Service, start_service, stop_service

pytestmark = pytest.mark.e2e

# Operations that would erase or rebuild the service's data under the test's feet.
SKIPPED = ("/v1/admin/", "/v1/memory/prune", "/v1/kb/ingest")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(tmp_path_factory.mktemp("hostile"))
    try:
        yield service
    finally:
        stop_service(service)


def test_generated_requests_never_get_a_5xx_and_every_4xx_says_why(running: Service) -> None:
    schema = schemathesis.openapi.from_url(f"{running.base}/openapi.json")
    tried: dict[str, int] = {}
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if operation.path.startswith(SKIPPED):
            continue

        check = _checker(running.base, label, tried, problems)
        settings(
            max_examples=6,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(given(operation.as_strategy())(check))()
    assert len(tried) >= 25, sorted(tried)
    assert problems == [], "\n".join(problems[:20])


def _checker(base: str, label: str, tried: dict[str, int], problems: list[str]) -> Any:
    def check(case: Any) -> None:
        response = case.call(base_url=base, timeout=60)
        tried[label] = tried.get(label, 0) + 1
        if response.status_code >= 500:
            problems.append(f"{label} -> {response.status_code}: {response.text[:300]}")
        elif response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            if not (body.get("detail") or body.get("error", {}).get("message")):
                problems.append(f"{label} -> {response.status_code} without a message")

    return check
