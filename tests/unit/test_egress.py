"""The egress policy (SSRF, OWASP API7): which hosts workflow http steps and deployments'
base_url may reach. The default refuses link-local and metadata addresses."""

from __future__ import annotations

import asyncio

import pytest

from infra.config import ConfigError, load_config
from infra.egress import EgressPolicy, EgressRefused, check_url
from infra.services.workflows import StepContext, StepFailure, http_action

DEFAULT = EgressPolicy()


def no_dns(host: str) -> list[str]:
    return []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0:8000/",
        "file:///etc/passwd",
        "gopher://127.0.0.1/",
    ],
)
def test_the_default_refuses_link_local_metadata_and_non_http(url: str) -> None:
    with pytest.raises(EgressRefused):
        check_url(url, DEFAULT, resolver=no_dns)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "http://10.0.0.7/v1", "https://api.openai.com/v1"]
)
def test_the_default_allows_loopback_private_and_public_hosts(url: str) -> None:
    check_url(url, DEFAULT, resolver=no_dns)


def test_a_name_is_checked_by_every_address_it_resolves_to() -> None:
    with pytest.raises(EgressRefused, match=r"resolves to 169\.254\.169\.254"):
        check_url("http://innocent.example/", DEFAULT, resolver=lambda h: ["169.254.169.254"])


def test_deny_private_and_allow_hosts() -> None:
    strict = EgressPolicy(deny_private=True)
    with pytest.raises(EgressRefused, match="private"):
        check_url("http://10.0.0.7/", strict, resolver=no_dns)
    only = EgressPolicy(allow_hosts=["models.internal"])
    check_url("http://models.internal/v1", only, resolver=no_dns)
    with pytest.raises(EgressRefused, match="allow_hosts"):
        check_url("http://127.0.0.1/", only, resolver=no_dns)


def test_a_deployment_base_url_at_a_metadata_address_fails_at_start_naming_the_key() -> None:
    deployments = [{"name": "evil", "model": "demo-fast", "provider": "openai",
                    "base_url": "http://169.254.169.254/v1"}]  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        load_config(env={}, overrides={"deployments": deployments})
    message = str(raised.value)
    assert "'deployments'" in message and "evil" in message and "metadata" in message


def test_a_workflow_http_step_at_a_metadata_address_is_refused() -> None:
    step = StepContext(run_id="r", workflow="w", step="s", iteration=0, attempt=1,
                       tenant_id="t", user_id="u", inputs={})  # fmt: skip
    with pytest.raises(StepFailure) as raised:
        asyncio.run(http_action()({"url": "http://169.254.169.254/latest/meta-data/"}, step))
    assert raised.value.error_class == "EgressRefused"
