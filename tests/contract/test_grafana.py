"""The Grafana dashboard, the K8s manifests and docs/observability.md name only metrics that exist: every metric a
panel queries is exported by the running orchestrator or the running Triton (both /metrics endpoints of the session
fixtures are scraped), and every label a panel groups or filters by is one those series carry.

GPU-only metrics cannot appear on the CPU-only machines tests run on: they are in GPU_ONLY, with the reason.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from grym import Client
from grym.v1 import orchestrator_pb2 as pb
from support import tone

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/grym-synth-dashboard.json"
# Triton exports nv_gpu_* only when it finds a GPU (and nv_cpu_* only with --allow-cpu-metrics, which the embedded
# Triton turns off); the dashboard's GPU panel is for GPU nodes. Names from Triton's metrics docs (2.51).
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
# Labels Prometheus adds when it scrapes a pod (kubernetes_sd relabelling), and PromQL's own.
SCRAPE_LABELS = {"namespace", "pod", "le"}
METRIC = re.compile(r"\b((?:grym|process|nv)_[a-z0-9_]+)\b")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def _exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Names a PromQL query may use (families and their sample suffixes) and the label names seen per name."""
    families = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    names = families | {f + s for f in families for s in SUFFIXES}
    labels: dict[str, set[str]] = {}
    for name, body in re.findall(r"^([a-zA-Z_:][\w:]*)\{([^}]*)\}", text, flags=re.M):
        labels.setdefault(name, set()).update(re.findall(r"(\w+)=", body))
    return names, labels


@pytest.fixture(scope="module")
def exported(orchestrator, triton,  # type: ignore[no-untyped-def]
             client: Client) -> tuple[set[str], dict[str, set[str]]]:
    client.analyze(tone(0.5, seed=123), sample_rate_hz=16_000)  # so that Triton's per-model series exist
    with pytest.raises(grpc.RpcError):  # and a stream error (Generate refused: unknown output format)
        list(client.stub.Generate(pb.GenerateRequest(prompt="x", output_format=42), timeout=30))
    names, labels = _exported(_scrape(orchestrator.metrics_url))
    t_names, t_labels = _exported(_scrape(triton.metrics_url))
    return names | t_names, labels | t_labels


def _targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_panel_queries_metrics_that_are_exported(exported: tuple[set[str], dict[str, set[str]]]) -> None:
    names, _ = exported
    missing = {(title, m) for title, expr in _targets() for m in METRIC.findall(expr)
               if m not in names and m not in GPU_ONLY}
    assert not missing, missing
    assert any(m.startswith("nv_inference") for _, e in _targets() for m in METRIC.findall(e))


def test_every_label_a_panel_uses_is_carried_by_its_series(exported: tuple[set[str], dict[str, set[str]]]) -> None:
    _, labels = exported
    checked = 0
    for title, expr in _targets():
        metrics = set(METRIC.findall(expr)) - GPU_ONLY
        if not metrics or any(m not in labels for m in metrics):
            continue  # a series not written yet (no breaker trip, no rejection...) shows no labels to compare
        checked += 1
        used = set()
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            used |= {x.strip() for x in group.split(",")}
        used |= set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!=|!~|=)", expr))
        carried = set().union(*(labels[m] for m in metrics), SCRAPE_LABELS)
        assert used <= carried, (title, used - carried)
    assert checked >= len(_targets()) // 2, checked


def test_namespace_and_pod_variables_scope_every_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "pod", "triton_pod"} <= variables.keys()
    for name in ("namespace", "pod", "triton_pod"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"  # no labels: match all
    for title, expr in _targets():
        for selector in re.findall(r"\b(?:grym|process|nv)_[a-z0-9_]+(\{[^}]*\})?", expr):
            assert 'namespace=~"$namespace"' in selector, (title, expr)
            assert 'pod=~"$pod"' in selector or 'pod=~"$triton_pod"' in selector, (title, expr)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# Identifiers with a metric-like prefix that are not metrics: the package, the Python-based backend, the Milvus
# collection prefix.
NOT_METRICS = {"grym_synth", "grym_python", "grym_patterns"}
# Names docs/observability.md lists as renamed away: they must not be exported any more.
RENAMED = {"grym_triton_queue_seconds_avg", "grym_triton_compute_seconds_avg"}
DOCUMENTED = re.compile(r"`((?:grym|process|nv)_[a-z0-9_]+)")


def test_names_in_docs_and_manifests_exist(exported: tuple[set[str], dict[str, set[str]]]) -> None:
    names, _ = exported
    docs = [ROOT / "docs/observability.md", ROOT / "README.md", ROOT / "deploy/README.md"]
    mentioned = {(p.name, m) for p in docs for m in DOCUMENTED.findall(p.read_text())}
    # manifests name metrics without backticks (annotations, HPA custom metrics)
    mentioned |= {(p.name, m) for p in sorted((ROOT / "deploy/k8s").glob("*.yaml")) for m in METRIC.findall(
        p.read_text())}
    assert len([m for p, m in mentioned if p == "observability.md"]) > 20
    # a name ending in "_" is a family named by its prefix (`nv_*`), not a metric
    known = names | GPU_ONLY | NOT_METRICS | RENAMED
    unknown = {(p, m) for p, m in mentioned if m not in known and not m.endswith("_")}
    assert not unknown, unknown
    assert not RENAMED & names
