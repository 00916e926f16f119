"""``make prometheus-check``: every dashboard query returns data from a real run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "prometheus_check.py"


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prometheus_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grafana_variables_expanded() -> None:
    check = _load_script()
    expr = 'sum by (route) (rate(mopd_teacher_route_scored_total{route=~"$route"}[$__rate_interval]))'
    assert check.expand_variables(expr) == 'sum by (route) (rate(mopd_teacher_route_scored_total{route=~".*"}[30s]))'


def test_unknown_grafana_variable_rejected() -> None:
    check = _load_script()
    with pytest.raises(check.CheckError, match="unknown Grafana variable"):
        check.expand_variables("rate(mopd_rows_read_total[$window])")


def test_nested_row_panels_collected() -> None:
    check = _load_script()
    dashboard = {"panels": [
        {"title": "a", "targets": [{"expr": "up"}]},
        {"type": "row", "panels": [{"title": "b", "targets": [{"expr": "mopd_policy_version"}, {"expr": ""}]}]},
    ]}
    assert check.dashboard_queries(dashboard) == [("a", "up"), ("b", "mopd_policy_version")]


def _prometheus_available() -> bool:
    if shutil.which("prometheus"):
        return True
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(not _prometheus_available(),
                    reason="no prometheus binary, and it cannot be installed here (needs root and apt-get)")
def test_every_dashboard_query_returns_data() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOPD_", "DISTILLATION_", "OPD_"))}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=400, env=env,
                          cwd=REPO)
    output = done.stdout + done.stderr
    summary = re.search(r"^(\d+) of (\d+) dashboard queries returned data$", done.stdout, re.MULTILINE)
    assert summary is not None, output
    answered, total = int(summary.group(1)), int(summary.group(2))
    assert total >= 10, output
    assert answered == total, output
    assert done.returncode == 0, output
