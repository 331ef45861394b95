"""Configuration layering: defaults < file < profile < environment, with provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.config import ConfigError, load_config

FILE = """
tenant = "acme"

[http]
port = 8100

[clickhouse]
path = "/data/chdb"

[profiles.prod.http]
port = 8200
host = "0.0.0.0"

[profiles.prod.broker]
bootstrap_servers = "kafka-1:9092,kafka-2:9092"
enable_idempotence = true
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "chatllm.toml"
    path.write_text(FILE)
    return path


def test_defaults_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no chatllm.toml here
    loaded = load_config(env={})
    assert loaded.settings.http.port == 8000
    assert loaded.settings.broker.bootstrap_servers == ""
    assert set(loaded.sources.values()) == {"default"}


def test_each_layer_overrides_the_one_below(config_file: Path) -> None:
    loaded = load_config(
        config_file, "prod", env={"CHATLLM_HTTP__PORT": "8300", "CHATLLM_RAY__SHARDS": "3"}
    )
    s = loaded.settings
    assert s.tenant == "acme"  # file
    assert s.clickhouse.path == "/data/chdb"  # file
    assert s.http.host == "0.0.0.0"  # profile
    assert s.broker.enable_idempotence is True  # profile
    assert s.http.port == 8300  # env beats profile and file
    assert s.ray.shards == 3
    assert loaded.sources["tenant"] == f"file {config_file}"
    assert loaded.sources["http.host"] == "profile prod"
    assert loaded.sources["http.port"] == "env CHATLLM_HTTP__PORT"
    assert loaded.sources["log.level"] == "default"


def test_file_and_profile_can_come_from_the_environment(config_file: Path) -> None:
    loaded = load_config(env={"CHATLLM_CONFIG": str(config_file), "CHATLLM_PROFILE": "prod"})
    assert loaded.settings.http.port == 8200


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CHATLLM_HTTP__PORT": "eighty"},
            "'http.port' (from env CHATLLM_HTTP__PORT): Expected `int`",
        ),
        (
            {"CHATLLM_HTTP__PORT": "70000"},
            "'http.port' (from env CHATLLM_HTTP__PORT): Expected `int` <= 65535",
        ),
        ({"CHATLLM_TOPICS__PARTITIONS": "0"}, "'topics.partitions'"),
        ({"CHATLLM_LOG__LEVEL": "LOUD"}, "'log.level'"),
        (
            {"CHATLLM_HTTP__PROT": "1"},
            "unknown config key 'http.prot' (from env CHATLLM_HTTP__PROT)",
        ),
    ],
)
def test_bad_values_name_the_key_its_source_and_why(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert message in str(info.value)


def test_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[http]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'http.prot' \(from file"):
        load_config(path, env={})


def test_bad_value_in_a_profile_names_the_profile(config_file: Path) -> None:
    path = config_file.parent / "p.toml"
    path.write_text('[profiles.dev.http]\nport = "x"\n')
    with pytest.raises(ConfigError, match=r"'http.port' \(from profile dev\)"):
        load_config(path, "dev", env={})


def test_missing_profile_lists_the_known_ones(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile 'staging' is not defined \(profiles: prod\)"):
        load_config(config_file, "staging", env={})


def test_missing_and_invalid_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[http\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_policies_and_deployments_come_from_toml_and_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
[limits]
user = "10/minute"

[routing]
fallbacks = {gpt = ["demo-1"]}
bands = [{name = "all", max_complexity = 1.0, model = "gpt"}]

[[deployments]]
name = "gpt-a"
model = "gpt"
provider = "openai"
base_url = "http://127.0.0.1:9999/v1"

[[deployments]]
name = "demo-1-a"
model = "demo-1"
"""
    )
    loaded = load_config(path, env={"CHATLLM_LIMITS__RATE_PER_S": "5"})
    s = loaded.settings
    assert s.limits.user == "10/minute" and s.limits.rate_per_s == 5.0
    # A map keyed by model names is set as a whole, not merged key by key.
    assert s.routing.fallbacks == {"gpt": ["demo-1"]}
    assert [d.name for d in s.deployments] == ["gpt-a", "demo-1-a"]


def test_lists_in_the_environment_are_json(tmp_path: Path) -> None:
    deployments = [{"name": f"{m}-x", "model": m} for m in ("demo-fast", "demo-1", "demo-large")]
    loaded = load_config(env={"CHATLLM_DEPLOYMENTS": json.dumps(deployments)})
    assert [d.name for d in loaded.settings.deployments] == [
        "demo-fast-x",
        "demo-1-x",
        "demo-large-x",
    ]
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(env={"CHATLLM_DEPLOYMENTS": "[oops"})


def test_a_band_routing_to_an_unserved_model_is_named() -> None:
    bands = '[{"name": "big", "max_complexity": 1.0, "model": "gpt-9"}]'
    with pytest.raises(
        ConfigError, match="band 'big' routes to model 'gpt-9', which no deployment serves"
    ):
        load_config(env={"CHATLLM_ROUTING__BANDS": bands})


def test_every_detector_setting_comes_from_the_anomalies_section() -> None:
    from infra.services.processors import detector_config

    env = {"CHATLLM_ANOMALIES__WINDOW_S": "30", "CHATLLM_ANOMALIES__COOLDOWN_S": "5"}
    config = detector_config(load_config(env=env).settings)
    assert (config.window_s, config.cooldown_s) == (30.0, 5.0)


def test_a_profile_switch_lists_changed_keys_with_secrets_as_digests(tmp_path: Path) -> None:
    from infra.config import changes, is_live

    path = tmp_path / "chatllm.toml"
    path.write_text(
        '[profiles.prod.limits]\nuser = "5/minute"\n'
        '[profiles.prod.workflows]\napi_key = "s3cret"\n'
        "[profiles.prod.http]\nport = 9001\n"
    )
    before, after = load_config(path, env={}), load_config(path, "prod", env={})
    found = {key: (b, a) for key, b, a in changes(before, after)}
    assert found["limits.user"] == ("600/hour;5000/day", "5/minute")
    assert found["http.port"] == (8000, 9001)
    assert found["workflows.api_key"][1].startswith("sha256:")
    assert "s3cret" not in repr(found)
    assert is_live("limits.user") and not is_live("http.port")
    assert (after.path, after.profile) == (str(path), "prod")


def test_config_show_masks_secrets_and_passwords_inside_urls() -> None:
    """`chatllm config show` never prints a password, in either format (issue 23, item 6)."""
    import subprocess
    import sys

    env = {
        "CHATLLM_CLICKHOUSE__URL": "http://admin:s3cret@ch.internal:8123",
        "CHATLLM_WORKFLOWS__API_KEY": "sk-workflow-secret",
        "COLUMNS": "250",
        "PATH": "/usr/bin:/bin",
    }
    for fmt in ("table", "json"):
        shown = subprocess.run(
            [sys.executable, "-m", "infra.cli", "config", "show", "--format", fmt],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "s3cret" not in shown.stdout and "sk-workflow-secret" not in shown.stdout
        assert "admin:***@ch.internal" in shown.stdout


def test_the_readme_learned_routing_snippet_keeps_every_default_band(tmp_path: Path) -> None:
    """Pasted as-is, the README's snippet adds candidates and keeps the three bands (a
    `[[routing.bands]]` list replaces the default one whole; issue 23, item 14)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = re.search(r"```toml\n(\[routing\.learning\].*?)```", readme, flags=re.S)
    assert snippet is not None
    (tmp_path / "chatllm.toml").write_text(snippet.group(1))
    s = load_config(tmp_path / "chatllm.toml", env={}).settings
    assert s.routing.learning.enabled
    defaults = load_config(env={}).settings.routing.bands
    assert [b.name for b in s.routing.bands] == [b.name for b in defaults]
    assert [(b.max_complexity, b.model) for b in s.routing.bands] == [
        (b.max_complexity, b.model) for b in defaults
    ]
    assert any(b.candidates for b in s.routing.bands)
