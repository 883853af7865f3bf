"""Every config under cluster/ is checked: the cluster-launcher YAMLs against Ray's own schema and
checks, the KubeRay manifests against the CRD fields they use, and the Serve config embedded in the
RayService against serve_config.yaml."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import ray
import yaml

from ray_app.serve.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
# GPU types of the instance types the launcher configs use (what Ray detects as accelerator_type)
GPU_OF_INSTANCE = {"g5.2xlarge": "A10G", "g6e.12xlarge": "L40S", "Standard_NV36ads_A10_v5": "A10",
                   "Standard_NC24ads_A100_v4": "A100"}


def test_there_are_configs_to_check():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "azure.yaml", "local.yaml"}
    assert {p.name for p in KUBERAY} >= {"rayservice.yaml", "raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema or consistency error
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        if name != config["head_node_type"]:
            assert node["min_workers"] <= node["max_workers"] <= config["max_workers"], name


@pytest.mark.parametrize("path", [p for p in LAUNCHER if p.name != "local.yaml"], ids=lambda p: p.name)
def test_cloud_configs_have_gpu_groups_that_scale_to_zero_and_install_the_gpu_extra(path):
    config = yaml.safe_load(path.read_text())
    groups = {name: node for name, node in config["available_node_types"].items() if "gpu" in name}
    assert set(groups) == {"gpu_small", "gpu_large"}
    for name, node in groups.items():
        assert node["min_workers"] == 0 and node["resources"] == {name.replace("gpu_", "") + "_gpu": 1}
    assert config["idle_timeout_minutes"] > 0
    assert any('".[gpu]"' in command for command in config["setup_commands"])
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")


def test_the_gpu_serve_config_asks_for_a_gpu_type_the_aws_cluster_has():
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    offered = {GPU_OF_INSTANCE[node["node_config"]["InstanceType"]]
               for name, node in aws["available_node_types"].items() if "gpu" in name}
    app = yaml.safe_load((ROOT / "configs" / "serve" / "gpu.yaml").read_text())["applications"][0]
    wanted = {llm["accelerator_type"] for llm in app["args"]["llms"] if llm.get("accelerator_type")}
    assert wanted and wanted <= offered


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in KUBERAY if p.name != "pvc.yaml"}


def _cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec


@pytest.mark.parametrize("name", ["rayservice.yaml", "raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_use_the_crd_fields_consistently(name):
    manifest = _manifests()[name]
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"rayservice.yaml": "RayService", "raycluster.yaml": "RayCluster",
                                "rayjob.yaml": "RayJob"}[name]
    spec = _cluster_spec(manifest)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        containers = group["template"]["spec"]["containers"]
        images |= {c["image"] for c in containers}
        for container in containers:
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu")
        custom = group["rayStartParams"].get("resources")
        if custom:
            assert isinstance(json.loads(json.loads(custom)), dict)  # KubeRay passes it through a shell
    assert len(images) == 1, images
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])


def test_the_rayservice_embeds_the_shipped_serve_config():
    service = _manifests()["rayservice.yaml"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert embedded["applications"] == shipped["applications"], \
        "cluster/kuberay/rayservice.yaml's serveConfigV2 differs from serve_config.yaml: copy the applications over"
    assert embedded["http_options"]["host"] == "0.0.0.0"  # reachable through the Kubernetes service
    AppConfig.load(embedded["applications"][0]["args"])
    # every node serves the way the README's command does (HAProxy runs wherever a proxy does)
    from ray_app.serve import SERVING_ENV

    spec = service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        assert SERVING_ENV.items() <= {e["name"]: e["value"] for e in container["env"]}.items(), container["name"]


def test_the_grafana_dashboard_queries_the_metrics_we_export():
    import re

    dashboard = json.loads((ROOT / "cluster" / "grafana" / "ray_app_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    ours = {name for e in exprs for name in re.findall(r"ray_ray_app_(\w+?)(?:_bucket)?\b", e)}
    source = (ROOT / "ray_app" / "metrics.py").read_text()
    defined = set(re.findall(r'"ray_app_(\w+)"', source))
    assert ours and ours <= defined, ours - defined
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
