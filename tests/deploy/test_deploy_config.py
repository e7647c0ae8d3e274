"""Static checks of the container set-up (the live check is deploy/e2e.sh): the compose file,
Prometheus's scrape config, and Grafana's provisioning, which cannot be run here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.service.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
# What an operator looks for first; every dashboard shipped must show each.
DASHBOARD_TOPICS = (
    "request rate",
    "error rate",
    "latency",
    "batch size",
    "queue depth",
    "inference",
    "explain",
)


def exported_series(server: RunningServer) -> set[str]:
    httpx.post(f"{server.url}/predict", json={"inputs": "great"})
    httpx.post(f"{server.url}/predict", json={"inputs": ""})  # a failure, so labels exist
    httpx.post(f"{server.url}/explain", json={"inputs": "great"})
    text = httpx.get(f"{server.url}/metrics").text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_dashboard_query_uses_metrics_the_service_exports(server: RunningServer):
    series = exported_series(server)
    dashboards = list(DASHBOARDS.glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        assert expressions
        for expr in expressions:
            names = set(re.findall(r"\bsentiment_[a-z_]+", expr))
            assert names, expr
            assert names <= series, f"{path.name}: {expr} uses {names - series}"
        titles = " ".join(p["title"].lower() for p in dashboard["panels"])
        for topic in DASHBOARD_TOPICS:
            assert topic in titles, f"{path.name} has no {topic} panel"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())[
        "providers"
    ]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_prometheus_scrapes_the_api_service():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]


def test_torch_threads_match_each_deployments_cpu_limit():
    """If this fails, a container on a many-core host runs one inference worker per host core
    inside a quota of a few: torch counts the host's cores, not the container's."""
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    default = api["environment"]["SENTIMENT_TORCH_THREADS"].removesuffix("}").split(":-")[1]
    assert int(default) == int(api["cpus"])
    swarm = yaml.safe_load((ROOT / "deploy/swarm/stack.yml").read_text())["services"]["api"]
    limit = swarm["deploy"]["resources"]["limits"]["cpus"]
    assert int(swarm["environment"]["SENTIMENT_TORCH_THREADS"]) == int(float(limit))


def test_compose_api_service_is_hardened():
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    assert api["read_only"] is True
    assert api["user"].split(":")[0] != "0"
    assert all(p.startswith("127.0.0.1:") for p in api["ports"])
    assert "healthcheck" in api
    assert api["restart"] == "unless-stopped"
    assert api["mem_limit"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["api"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    env = gpu["environment"]
    assert env["SENTIMENT_DEVICE"] == "cuda"
    # Every variable is a setting (the service ignores an unknown one, typo or not), and the
    # queue holds at least two batches beyond the one running, so batches can overlap.
    assert {k.removeprefix("SENTIMENT_").lower() for k in env} <= set(Settings.model_fields)
    assert int(env["SENTIMENT_MAX_QUEUE_TEXTS"]) >= 3 * int(env["SENTIMENT_MAX_BATCH_SIZE"])


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]]
)
def test_docker_compose_config_validates(files: list[str]):
    args = [a for f in files for a in ("-f", f)]
    result = subprocess.run(
        ["docker-compose", *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_swarm_stack_balances_over_every_task_and_rolls_out_start_first():
    """The parts of deploy/swarm that must agree with each other and with the service (the
    stack itself runs in deploy/swarm/e2e.sh)."""
    swarm = ROOT / "deploy" / "swarm"
    stack = yaml.safe_load((swarm / "stack.yml").read_text())
    api = stack["services"]["api"]
    assert api["deploy"]["endpoint_mode"] == "dnsrr"  # tasks.api lists every task
    update = api["deploy"]["update_config"]
    assert (update["order"], update["parallelism"]) == ("start-first", 1)
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    settings = Settings()
    longest_s = max(settings.request_timeout_s, settings.explain_timeout_s)
    assert int(api["stop_grace_period"].removesuffix("s")) >= longest_s + 5
    assert stack["networks"]["default"]["attachable"] is True
    prometheus = yaml.safe_load((swarm / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["dns_sd_configs"][0]["names"] == ["tasks.api"]
    assert job["dns_sd_configs"][0]["port"] == settings.port
    haproxy = (swarm / "haproxy.cfg").read_text()
    assert f"tasks.api:{settings.port}" in haproxy
    assert "option httpchk GET /ready" in haproxy
