"""Every Triton model config in model_repository/ parses as Triton's ModelConfig protobuf and is consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from server.export.repository import ALL_MODELS, EXPORTERS, SHARED_MODEL_PY, SHARED_SUPPORT

REPO = Path(__file__).resolve().parent.parent / "model_repository"
CONFIGS = sorted(REPO.glob("*/config.pbtxt")) + sorted(REPO.glob("*/configs/*.pbtxt"))


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_parses_and_names_its_folder(path: Path) -> None:
    config = parse(path)
    folder = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == folder.name
    assert config.input and config.output
    if config.backend == "python":
        shared = SHARED_MODEL_PY.get(folder.name)
        model_py = REPO / "_shared" / shared if shared else folder / "1" / "model.py"
        assert model_py.exists(), "python-backend model without a model.py"
    if config.max_batch_size > 0 and folder.name != "coordinator":
        assert config.HasField("dynamic_batching") or config.model_transaction_policy.decoupled


def test_every_served_model_has_a_template_and_streaming_models_are_decoupled() -> None:
    assert set(ALL_MODELS) == {p.parent.name for p in REPO.glob("*/config.pbtxt")}
    assert set(SHARED_MODEL_PY) <= set(ALL_MODELS) and set(SHARED_SUPPORT) <= set(ALL_MODELS)
    assert all((REPO / "_shared" / module).exists() for modules in SHARED_SUPPORT.values() for module in modules)
    for name in ("audioldm", "coordinator"):
        assert parse(REPO / name / "config.pbtxt").model_transaction_policy.decoupled, name
    assert set(EXPORTERS) <= set(ALL_MODELS)


def test_native_variants_keep_the_tensor_contract() -> None:
    """configs/onnxruntime.pbtxt and configs/tensorrt.pbtxt serve the same ONNX file with the same tensors."""
    for variant in REPO.glob("*/configs/*.pbtxt"):
        base = parse(variant.parent.parent / "config.pbtxt")
        other = parse(variant)
        if other.backend in ("vllm",):
            continue  # the coordinator's vLLM variant speaks the vLLM backend's own tensors
        assert [(i.name, i.data_type) for i in other.input] == [(i.name, i.data_type) for i in base.input], variant
        assert [(o.name, o.data_type) for o in other.output] == [(o.name, o.data_type) for o in base.output], variant


def test_a_built_repository_picks_up_template_changes_without_reexport(tmp_path: Path) -> None:
    """An up-to-date repository gets the templates' configs and code again; generated files stay untouched."""
    from server.export.repository import _copy_template, _refresh_template

    built = _copy_template("unet", tmp_path)
    (built / "1" / "model.onnx").write_bytes(b"generated")
    (built / "config.pbtxt").write_text("stale")
    (built / "1" / "model.py").write_text("stale")
    (built / "1" / "ort_session.py").unlink()
    assert _refresh_template("unet", tmp_path)
    assert (built / "config.pbtxt").read_text() == (REPO / "unet" / "config.pbtxt").read_text()
    assert (built / "1" / "model.py").read_text() == (REPO / "_shared" / SHARED_MODEL_PY["unet"]).read_text()
    assert (built / "1" / "ort_session.py").read_text() == (REPO / "_shared" / "ort_session.py").read_text()
    assert (built / "1" / "model.onnx").read_bytes() == b"generated"
    assert not _refresh_template("unet", tmp_path)
