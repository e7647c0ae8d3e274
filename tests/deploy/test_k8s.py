"""The Kubernetes manifests (deploy/k8s/): each overlay rendered as kustomize would (its JSON
patches applied to the base), every object validated against the Kubernetes API schemas
(kubernetes-validate, strict), and the parts that must agree with the service checked against
the service itself: its settings, its routes, its metric names, its shutdown timing."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.deploy.test_deploy_config import exported_series
from tests.service.conftest import RunningServer

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # an older supported release, and the newest schemas
OVERLAYS = ("cpu", "gpu")
APP = {"app.kubernetes.io/name": "sentiment-api"}
UVICORN_MARGIN_S = 5  # python -m service: graceful shutdown = longest deadline + 5 s


def render(folder: Path) -> list[dict[str, Any]]:
    """kustomize's output for the subset of kustomize these manifests use: resources (files or
    folders), common labels, and JSON 6902 patches selected by kind and name."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for label in spec.get("labels", []):
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for patch in spec.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load(patch["patch"])
        matches = [
            i
            for i, obj in enumerate(objects)
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]
        ]
        assert matches, f"patch target {target} matches nothing"
        for i in matches:
            objects[i] = jsonpatch.apply_patch(copy.deepcopy(objects[i]), operations)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S / "overlays" / request.param)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(
    rendered: list[dict[str, Any]], version: str
):
    """If this fails, `kubectl apply` would refuse the manifest (or silently drop a field)."""
    kinds = set()
    for obj in rendered:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below
        kubernetes_validate.validate(obj, version, strict=True)
    assert kinds == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "ConfigMap",
    }


def test_the_pods_run_the_service_as_its_settings_and_routes_expect(
    rendered: list[dict[str, Any]],
):
    deployment = by_kind(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (env.get("SENTIMENT_DEVICE") == "cuda") == (gpus == "1")
    if gpus:
        env["SENTIMENT_DEVICE"] = "cpu"  # checked against the node's CUDA at start, not here
    else:  # one inference worker per torch thread: as many as the pod's CPUs, not the node's
        assert env["SENTIMENT_TORCH_THREADS"] == container["resources"]["limits"]["cpu"]
    # The environment is a valid configuration of the service (a typo here would stop the pod).
    settings = Settings(**{k.removeprefix("SENTIMENT_").lower(): v for k, v in env.items()})
    assert container["ports"][0]["containerPort"] == settings.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Grace covers the preStop pause and the drain: nothing admitted is cut off.
    pause_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_s = max(settings.request_timeout_s, settings.explain_timeout_s) + UVICORN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= pause_s + drain_s
    # Non-root, read-only root filesystem, a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]
    # A rollout adds a ready pod before it removes one.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["template"]["metadata"]["labels"] == APP


def test_service_budget_and_monitor_select_the_pods(rendered: list[dict[str, Any]]):
    assert by_kind(rendered, "Service")["spec"]["selector"] == APP
    assert by_kind(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == APP
    monitor = by_kind(rendered, "ServiceMonitor")
    service = by_kind(rendered, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    hpa = by_kind(rendered, "HorizontalPodAutoscaler")
    pdb = by_kind(rendered, "PodDisruptionBudget")
    # A drain can always proceed: there are more pods than the budget keeps.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_the_autoscaler_reads_a_queue_metric_the_service_exports(
    rendered: list[dict[str, Any]], server: RunningServer
):
    """If this fails, the HPA waits for a custom metric that never comes."""
    hpa = by_kind(rendered, "HorizontalPodAutoscaler")
    (pods_metric,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    rules = yaml.safe_load(by_kind(rendered, "ConfigMap")["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[pods_metric["metric"]["name"]]
    series = rule["seriesQuery"].split("{")[0]
    assert series in exported_series(server)
    assert series in rule["metricsQuery"]
    assert int(pods_metric["target"]["averageValue"]) > 0
