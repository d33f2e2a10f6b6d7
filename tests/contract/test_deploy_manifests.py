"""deploy/: Kubernetes manifests, the single-host compose file, and perf_analyzer's input data.

WHY: nothing here runs in CI as a deployment (no cluster, no GPU), so these checks are what keeps the files
honest: every manifest is validated strictly against the Kubernetes OpenAPI schemas (kubernetes-validate bundles
them), the compose file against the Compose Specification schema, and the cross-file facts that break a real
rollout are asserted (ports, probe targets, label selectors, GRYM_* names that Settings really reads, Triton
config variants that exist). The perf_analyzer JSON files are checked against every config variant of their model
and, where the test Triton serves the model, run through the real perf_analyzer.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
PERF_DIR = DEPLOY / "perf_analyzer"
MODEL_TEMPLATES = ROOT / "model_repository"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# Oldest and a recent Kubernetes minor the manifests must be valid for (native gRPC probes are GA since 1.27).
K8S_VERSIONS = ("1.30.0", "1.34.0")

sys.path.insert(0, str(PERF_DIR))
import make_inputs  # noqa: E402


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


# --- loading ------------------------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


DOCS = _documents()


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


CONFIG = _one("ConfigMap", "grym-config")["data"]
ORCHESTRATOR = _one("Deployment", "grym-orchestrator")
TRITON = _one("Deployment", "triton")


# --- schema validation --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (pip install 'kubernetes-validate>=1.30')")
    return kubernetes_validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_is_valid_kubernetes(kubernetes_validate, where: str, doc: dict[str, Any], version: str) -> None:
    """Strict schema validation: unknown or misspelt fields fail too."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} ({doc['kind']}/{doc['metadata']['name']}) invalid for Kubernetes {version}: {exc}")


def test_schema_validation_rejects_a_broken_probe(kubernetes_validate) -> None:
    """Negative control: a misspelt probe field is reported, so the test above can fail."""
    broken = json.loads(json.dumps(ORCHESTRATOR))
    probe = _container(broken, "orchestrator")["readinessProbe"]
    probe["grpc"]["prot"] = probe["grpc"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifest_files())
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].rsplit(":", 1)[0] for _, d in DOCS if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert used == images


def test_kustomize_renders(tmp_path: Path) -> None:
    """kubectl's built-in kustomize renders the overlay (skipped where kubectl is not installed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the per-file checks above cover the manifests")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(DOCS)
    namespaced = [d for d in rendered if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"grym"}


# --- orchestrator -------------------------------------------------------------------------------------------


def test_grym_variables_are_settings_fields_and_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GRYM_* key in the ConfigMap is a Settings field (no typos) and the values validate."""
    from grym_synth.settings import Settings

    grym = {k: v for k, v in CONFIG.items() if k.startswith("GRYM_")}
    unknown = [k for k in grym if k[len("GRYM_"):].lower() not in Settings.model_fields]
    assert not unknown, f"not Settings fields: {unknown}"
    for required in ("GRYM_TRITON_URL", "GRYM_MILVUS_URI", "GRYM_PORT", "GRYM_METRICS_PORT", "GRYM_PROFILE",
                     "GRYM_DATA_DIR", "GRYM_HOST"):
        assert required in grym
    for key in list(os.environ):
        if key.startswith("GRYM_"):
            monkeypatch.delenv(key)
    for key, value in grym.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0", "the pod must listen on all interfaces"
    assert not settings.embedded_triton
    assert settings.milvus_uri and settings.milvus_uri.startswith("http://")


def test_orchestrator_deployment_is_stateless_with_grpc_probes() -> None:
    spec = ORCHESTRATOR["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    c = _container(ORCHESTRATOR, "orchestrator")
    grpc_port = _port(c, "grpc")
    assert grpc_port == int(CONFIG["GRYM_PORT"])
    assert _port(c, "metrics") == int(CONFIG["GRYM_METRICS_PORT"])
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
        assert c[probe]["grpc"].get("service", "") == "", f"{probe} must check the whole server"
    assert c["livenessProbe"]["tcpSocket"]["port"] == grpc_port
    assert {"configMapRef": {"name": "grym-config"}} in c["envFrom"]
    # Stateless: only emptyDir volumes, data dir among them.
    assert all("emptyDir" in v for v in pod["volumes"])
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert CONFIG["GRYM_DATA_DIR"] in mounts
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(CONFIG["GRYM_METRICS_PORT"])
    assert pod["terminationGracePeriodSeconds"] > float(CONFIG["GRYM_GRACE_PERIOD_S"]) + 5


def _selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_hpa_and_pdb_target_the_right_pods() -> None:
    for name in ("grym-orchestrator", "grym-orchestrator-headless"):
        svc = _one("Service", name)
        assert _selects(svc["spec"]["selector"], ORCHESTRATOR), name
        names = {p["name"] for p in _container(ORCHESTRATOR, "orchestrator")["ports"]}
        assert all(p["targetPort"] in names for p in svc["spec"]["ports"])
    hpa = _one("HorizontalPodAutoscaler", "grym-orchestrator")
    assert hpa["spec"]["scaleTargetRef"]["name"] == ORCHESTRATOR["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= ORCHESTRATOR["spec"]["replicas"]
    pdb = _one("PodDisruptionBudget", "grym-orchestrator")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], ORCHESTRATOR)
    assert pdb["spec"]["minAvailable"] < ORCHESTRATOR["spec"]["replicas"]
    assert _selects(ORCHESTRATOR["spec"]["selector"]["matchLabels"], ORCHESTRATOR)
    assert _selects(TRITON["spec"]["selector"]["matchLabels"], TRITON)


# --- triton -------------------------------------------------------------------------------------------------


def test_triton_runs_on_a_gpu_with_kserve_probes() -> None:
    c = _container(TRITON, "tritonserver")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    http = _port(c, "http")
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", http)
    assert f"--http-port={http}" in c["args"] and f"--grpc-port={_port(c, 'grpc')}" in c["args"]
    assert "--model-config-name=$(TRITON_MODEL_CONFIG_NAME)" in c["args"]
    annotations = TRITON["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == _port(c, "metrics")
    # The repository is written by the init container into the volume Triton reads.
    init = TRITON["spec"]["template"]["spec"]["initContainers"][0]
    out = init["args"][init["args"].index("--output") + 1]
    repo = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--model-repository="))
    assert out == repo
    assert {m["name"] for m in init["volumeMounts"]} & {m["name"] for m in c["volumeMounts"]} >= {"models"}


def test_triton_config_variant_exists_for_every_onnx_model() -> None:
    """--model-config-name picks configs/<name>.pbtxt; every model that has native variants must have it."""
    name = CONFIG["TRITON_MODEL_CONFIG_NAME"]
    with_variants = [d for d in sorted(MODEL_TEMPLATES.iterdir()) if (d / "configs" / "onnxruntime.pbtxt").exists()]
    assert with_variants, "no model ships native onnxruntime variants"
    missing = [d.name for d in with_variants if not (d / "configs" / f"{name}.pbtxt").exists()]
    assert not missing, f"configs/{name}.pbtxt missing for {missing}"


def test_orchestrator_points_at_the_triton_service() -> None:
    host, port = CONFIG["GRYM_TRITON_URL"].rsplit(":", 1)
    svc = _one("Service", host)
    assert _selects(svc["spec"]["selector"], TRITON)
    grpc = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    assert grpc["name"] == "grpc" and grpc["targetPort"] == "grpc"


def test_triton_image_is_built_from_nvidias_container() -> None:
    dockerfile = (DEPLOY / "docker" / "triton.Dockerfile").read_text()
    version = re.search(r"^ARG TRITON_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", dockerfile, re.M)
    assert _container(TRITON, "tritonserver")["image"].endswith(f":{version}-py3")
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["triton"]["build"]["args"]["TRITON_VERSION"] == version


def test_triton_image_has_every_python_based_backend_a_config_names() -> None:
    """A config.pbtxt naming backend "grym_python" loads only where Triton finds
    <backend-directory>/grym_python/model.py: the image must COPY model_repository/backends/ (from the
    repository root, the compose build context) to /opt/tritonserver/backends/, NVIDIA's backend directory."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    builtin = {"python", "onnxruntime", "tensorrt", "vllm", "pytorch", "tensorflow", "openvino"}
    named = {text_format.Parse(p.read_text(), model_config_pb2.ModelConfig()).backend
             for p in MODEL_TEMPLATES.glob("*/config.pbtxt")} - builtin
    assert named == {"grym_python"}, named
    assert all((MODEL_TEMPLATES / "backends" / name / "model.py").is_file() for name in named)
    dockerfile = (DEPLOY / "docker" / "triton.Dockerfile").read_text()
    assert re.search(r"^COPY model_repository/backends/ /opt/tritonserver/backends/$", dockerfile, re.M)
    # COPY runs before the image drops to the unprivileged user, so the files stay root-owned (read-only to Triton).
    assert dockerfile.index("COPY model_repository/backends/") < dockerfile.index("USER triton-server")
    build = yaml.safe_load(COMPOSE.read_text())["services"]["triton"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT


def test_milvus_install_is_documented_for_the_configured_uri() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "helm install" in readme and "zilliztech/milvus" in readme
    host = CONFIG["GRYM_MILVUS_URI"].split("//", 1)[1].split(":", 1)[0]
    assert host in readme


# --- docker compose -----------------------------------------------------------------------------------------


COMPOSE_DOC = yaml.safe_load(COMPOSE.read_text())
SERVICES = COMPOSE_DOC["services"]


def test_compose_matches_the_compose_specification() -> None:
    try:
        import jsonschema
        schema_text = (importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                       / "compose-spec.json").read_text()
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        _missing("check-jsonschema (which vendors the Compose Specification schema) is not installed")
    validator = jsonschema.Draft202012Validator(json.loads(schema_text))
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(COMPOSE_DOC)]
    assert not errors, "\n".join(errors)
    broken = json.loads(json.dumps(COMPOSE_DOC))
    broken["services"]["triton"]["healthcheck"]["intervall"] = "10s"
    assert list(validator.iter_errors(broken)), "negative control: a misspelt key must fail the schema"


def test_compose_services_healthchecks_and_order() -> None:
    assert {"etcd", "minio", "milvus", "model-export", "triton", "orchestrator"} <= set(SERVICES)
    for name, svc in SERVICES.items():
        if name != "model-export":  # a one-shot job
            assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"
    assert SERVICES["orchestrator"]["depends_on"] == {
        "triton": {"condition": "service_healthy"}, "milvus": {"condition": "service_healthy"}}
    assert SERVICES["triton"]["depends_on"]["model-export"]["condition"] == "service_completed_successfully"
    assert "/v2/health/ready" in " ".join(SERVICES["triton"]["healthcheck"]["test"])


def test_compose_reserves_a_gpu_for_triton() -> None:
    devices = SERVICES["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 1) for d in devices)
    assert all("deploy" not in svc for name, svc in SERVICES.items() if name != "triton")


def test_compose_orchestrator_environment() -> None:
    from grym_synth.settings import Settings

    env = {**SERVICES["orchestrator"]["environment"]}
    unknown = [k for k in env if k.startswith("GRYM_") and k[5:].lower() not in Settings.model_fields]
    assert not unknown, f"not Settings fields: {unknown}"
    host, port = env["GRYM_TRITON_URL"].split(":")
    assert host in SERVICES and port == "8001"
    assert env["GRYM_MILVUS_URI"] == "http://milvus:19530"
    assert env["GRYM_HOST"] == "0.0.0.0"
    assert f"{env['GRYM_PORT']}:{env['GRYM_PORT']}" in SERVICES["orchestrator"]["ports"]


# --- perf_analyzer input data -------------------------------------------------------------------------------


def _config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _trt_ranges(config) -> dict[str, tuple[list[int], list[int]]]:
    """input -> (min shape, max shape) from a TensorRT EP optimisation profile, batch dimension included."""
    params: dict[str, str] = {}
    for acc in config.optimization.execution_accelerators.gpu_execution_accelerator:
        params.update(acc.parameters)
    ranges: dict[str, list[list[int]]] = {}
    for key in ("trt_profile_min_shapes", "trt_profile_max_shapes"):
        for item in filter(None, params.get(key, "").split(",")):
            name, dims = item.split(":")
            ranges.setdefault(name, []).append([int(x) for x in dims.split("x")])
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def _check_tensor(model: str, name: str, value: dict[str, Any], spec) -> list[str]:
    from tritonclient.grpc import model_config_pb2 as mc

    shape = value["shape"]
    problems = []
    if len(shape) != len(spec.dims) or any(d != -1 and d != s for d, s in zip(spec.dims, shape)):
        problems.append(f"{model}.{name}: shape {shape} does not fit dims {list(spec.dims)}")
    count = math.prod(shape)
    dtype = spec.data_type
    if "b64" in value:
        width = {mc.TYPE_FP32: 4, mc.TYPE_INT64: 8, mc.TYPE_INT32: 4, mc.TYPE_FP16: 2}.get(dtype)
        if width is None or len(base64.b64decode(value["b64"])) != count * width:
            problems.append(f"{model}.{name}: b64 payload is not {count} x {mc.DataType.Name(dtype)}")
    else:
        content = value["content"]
        checks = {
            mc.TYPE_STRING: lambda v: isinstance(v, str),
            mc.TYPE_BOOL: lambda v: isinstance(v, bool),
            mc.TYPE_INT32: lambda v: isinstance(v, int) and not isinstance(v, bool),
            mc.TYPE_INT64: lambda v: isinstance(v, int) and not isinstance(v, bool),
            mc.TYPE_FP32: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        }
        if len(content) != count or not all(checks[dtype](v) for v in content):
            problems.append(f"{model}.{name}: content is not {count} x {mc.DataType.Name(dtype)}")
    return problems


def _check_document(stem: str, doc: dict[str, Any], *, trt_profiles: bool = True) -> list[str]:
    """Problems of one input file against every config variant of its model (TensorRT optimisation profiles are
    sized for the full profile, so tiny inputs skip that part)."""
    target = make_inputs.TARGETS[stem]
    problems = []
    for variant in target.configs:
        config = _config(MODEL_TEMPLATES / target.model / variant)
        inputs = {i.name: i for i in config.input}
        where = f"{stem} vs {target.model}/{variant}"
        assert config.model_transaction_policy.decoupled == target.decoupled, f"{where}: decoupled mismatch"
        ranges = _trt_ranges(config) if trt_profiles else {}
        for row in doc["data"]:
            unknown = set(row) - set(inputs)
            required = {n for n, i in inputs.items() if not i.optional} - set(row)
            problems += [f"{where}: unknown input {n}" for n in sorted(unknown)]
            problems += [f"{where}: required input {n} missing" for n in sorted(required)]
            for name, value in row.items():
                if name in inputs:
                    problems += _check_tensor(f"{where}", name, value, inputs[name])
                if name in ranges:
                    lo, hi = ranges[name]
                    full = [1, *value["shape"]] if config.max_batch_size > 0 else value["shape"]
                    if not all(a <= s <= b for a, s, b in zip(lo, full, hi)):
                        problems.append(f"{where}: {name} shape {full} outside the TensorRT profile {lo}..{hi}")
    return problems


def test_every_triton_model_has_perf_input_data() -> None:
    models = {d.name for d in MODEL_TEMPLATES.iterdir() if (d / "config.pbtxt").exists()}
    covered = {t.model for t in make_inputs.TARGETS.values()}
    assert models <= covered, f"no perf_analyzer input data for {sorted(models - covered)}"
    assert sorted(p.stem for p in PERF_DIR.glob("*.json")) == sorted(make_inputs.TARGETS)


@pytest.mark.parametrize("stem", sorted(make_inputs.TARGETS))
def test_perf_input_matches_every_config_variant(stem: str) -> None:
    doc = json.loads((PERF_DIR / f"{stem}.json").read_text())
    problems = _check_document(stem, doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stem", sorted(make_inputs.TARGETS))
def test_tiny_profile_inputs_match_too(stem: str) -> None:
    problems = _check_document(stem, make_inputs.documents("tiny")[stem], trt_profiles=False)
    assert not problems, "\n".join(problems)


def test_perf_input_check_detects_a_wrong_dtype_and_shape() -> None:
    """Negative control for the checker."""
    doc = json.loads((PERF_DIR / "unet.json").read_text())
    doc["data"][0]["timestep"] = {"content": [1, 2], "shape": [2]}
    doc["data"][0]["bogus"] = {"content": [1], "shape": [1]}
    problems = " ".join(_check_document("unet", doc))
    assert "timestep: shape [2]" in problems and "unknown input bogus" in problems


def test_committed_perf_inputs_are_what_the_generator_writes() -> None:
    assert make_inputs.main(["--check"]) == 0, "re-run deploy/perf_analyzer/make_inputs.py"


@pytest.fixture(scope="module")
def perf_analyzer() -> tuple[str, dict[str, str]]:
    # scripts/install_tools.sh unpacks it from the tritonclient 2.41 wheel (newer wheels no longer ship it)
    binary = str(ROOT / "build" / "tools" / "perf_analyzer" / "perf_analyzer")
    if not Path(binary).exists():
        binary = shutil.which("perf_analyzer") or binary
    if not Path(binary).exists():
        _missing("no perf_analyzer binary: run scripts/install_tools.sh")
    env = dict(os.environ)
    cuda_rt = ROOT / "build" / "tools" / "cuda" / "nvidia" / "cuda_runtime" / "lib"
    if cuda_rt.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cuda_rt), env.get("LD_LIBRARY_PATH")]))
    probe = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env, timeout=30)
    if probe.returncode != 0 and "error while loading shared libraries" in probe.stderr:
        _missing(f"perf_analyzer cannot start ({probe.stderr.strip()}): run scripts/install_tools.sh")
    return binary, env


@pytest.mark.parametrize("stem", [s for s, t in make_inputs.TARGETS.items() if "config.pbtxt" in t.configs])
def test_perf_analyzer_runs_the_tiny_inputs(stem: str, perf_analyzer, triton, tmp_path: Path) -> None:
    """The real perf_analyzer drives the test Triton (tiny profile) with this input data without errors."""
    import tritonclient.grpc as grpcclient

    target = make_inputs.TARGETS[stem]
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        if not client.is_model_ready(target.model):
            pytest.skip(f"the test Triton does not serve {target.model}")
    data = tmp_path / f"{stem}.json"
    data.write_text(make_inputs.render(make_inputs.documents("tiny")[stem]))
    binary, env = perf_analyzer
    cmd = [binary, "-m", target.model, "-i", "grpc", "-u", triton.grpc_url, "--input-data", str(data),
           "--concurrency-range", "1:1", "--measurement-mode", "count_windows", "--measurement-request-count", "10",
           # Not a benchmark (shared 2-core CI box): any three windows count as stable.
           "--stability-percentage", "1000", "--max-trials", "6", "-f", str(tmp_path / "out.csv")]
    if target.decoupled:
        cmd.append("--streaming")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second") and len(rows) >= 2
    assert float(rows[1].split(",")[1]) > 0


def test_orchestrator_image_copies_everything_the_wheel_is_built_from() -> None:
    """The image installs the wheel (not editable): every source the build reads must be COPYed in. The list comes
    from pyproject.toml itself (package-dir, readme, the build hook and what it imports), so a new runtime file
    folder cannot be forgotten in the Dockerfile."""
    import tomllib

    dockerfile = (DEPLOY / "docker" / "orchestrator.Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            copied.update(s.rstrip("/").removeprefix("./") for s in sources)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "setup.py", "scripts/gen_protos.py", "proto", project["project"]["readme"]}
    needed |= {d.rstrip("/") for d in project["tool"]["setuptools"]["package-dir"].values()}
    missing = [n for n in needed if not any(n == c or n.startswith(c + "/") for c in copied)]
    assert not missing, f"orchestrator.Dockerfile does not COPY {sorted(missing)}"
    assert "pip install ." in dockerfile and "pip install -e" not in dockerfile
