"""The Kubernetes manifests in deploy/k8s validate against the Kubernetes schemas
(kubernetes-validate, offline), the KubeRay RayCluster's pod templates as core PodTemplates
plus the fields KubeRay requires, and the ConfigMap holds a chat-llm config that loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infra.config import load_config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.33"
DOCUMENTS = [
    (path.name, document)
    for path in sorted(K8S.glob("*.yaml"))
    for document in yaml.safe_load_all(path.read_text())
    if document
]


@pytest.mark.parametrize(
    ("name", "document"), DOCUMENTS, ids=[f"{n}:{d['kind']}" for n, d in DOCUMENTS]
)
def test_every_manifest_validates(name: str, document: dict[str, Any]) -> None:
    if document["kind"] == "RayCluster":
        _ray_cluster(document)
        return
    kubernetes_validate.validate(document, VERSION, strict=True)


def _ray_cluster(cluster: dict[str, Any]) -> None:
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] and "rayStartParams" in spec["headGroupSpec"]
    templates = [spec["headGroupSpec"]["template"]]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        templates.append(group["template"])
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
               "template": template}  # fmt: skip
        kubernetes_validate.validate(pod, VERSION, strict=True)


def test_the_configmap_holds_a_valid_production_config(tmp_path: Path) -> None:
    [config] = [d for _, d in DOCUMENTS if d["kind"] == "ConfigMap"]
    path = tmp_path / "chatllm.toml"
    path.write_text(config["data"]["chatllm.toml"])
    settings = load_config(path, env={}).settings
    assert settings.broker.bootstrap_servers and settings.clickhouse.url
    assert settings.ray.address.startswith("ray://") and settings.auth.required


def test_a_typo_in_a_manifest_is_caught() -> None:
    [_, deployment] = next((n, d) for n, d in DOCUMENTS if d["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)
