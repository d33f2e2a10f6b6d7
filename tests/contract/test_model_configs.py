"""Every Triton model config in model_repository/ parses as Triton's ModelConfig protobuf and is consistent.

Every config.pbtxt names the one Python-based backend ``grym_python`` (model_repository/backends/): the ONNX models'
folders hold only configs, audioldm and the coordinator their own 1/model.py, and the backend directory the embedded
server assembles has the backend where Triton looks."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from grym_synth.inference.export.repository import ALL_MODELS, EXPORTERS, MUSIC_MODELS

REPO = Path(__file__).resolve().parents[2] / "model_repository"
CONFIGS = sorted(REPO.glob("*/config.pbtxt")) + sorted(REPO.glob("*/configs/*.pbtxt"))
# Our Python-based backends: backends/<name>/model.py, named by configs as backend: "<name>".
PYTHON_BASED = {p.parent.name for p in REPO.glob("backends/*/model.py")}
# Backends of NVIDIA's containers that the configs/ variants name.
NATIVE = {"onnxruntime", "vllm"}
ONNX_MODELS = {"wav2vec2", "clap_text_encoder", "unet", "vae_decoder", "vocoder", "vae_encoder", *MUSIC_MODELS}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_parses_and_names_its_folder(path: Path) -> None:
    config = parse(path)
    folder = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == folder.name
    assert config.input and config.output
    if path.name == "config.pbtxt":
        assert config.backend in PYTHON_BASED, f"{config.backend!r} is not one of our Python-based backends"
        # ONNX models: the code lives once, in the backend; the others run their own 1/model.py (with its helper
        # modules beside it in 1/, e.g. the coordinator's constrained decoding).
        code = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))
        if folder.name in ONNX_MODELS:
            assert code == [], code
        else:
            assert "1/model.py" in code and all(c.startswith("1/") for c in code), code
    else:
        assert config.backend in NATIVE, f"unknown backend {config.backend!r}"
    if config.max_batch_size > 0 and folder.name != "coordinator":
        assert config.HasField("dynamic_batching") or config.model_transaction_policy.decoupled


def test_every_served_model_has_a_template_and_streaming_models_are_decoupled() -> None:
    assert set(ALL_MODELS) == {p.parent.name for p in REPO.glob("*/config.pbtxt")}
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


def test_every_model_shares_one_python_based_backend() -> None:
    """One backend for every config.pbtxt (Triton 2.41's python backend counts shared-memory regions per backend,
    so a second Python backend in one server would reuse the first one's region names); the ONNX models' native
    variants are NVIDIA's onnxruntime backend."""
    assert PYTHON_BASED == {"grym_python"}
    assert {parse(REPO / name / "config.pbtxt").backend for name in ALL_MODELS} == {"grym_python"}
    assert ONNX_MODELS <= set(ALL_MODELS)
    for name in ONNX_MODELS:
        variants = {p.stem: parse(p) for p in (REPO / name / "configs").glob("*.pbtxt")}
        # the music models (small, FP32-sensitive posteriors thresholded into notes/spans) have no TensorRT variant
        assert set(variants) == ({"onnxruntime"} if name in MUSIC_MODELS else {"onnxruntime", "tensorrt"}), name
        assert all(v.backend == "onnxruntime" and v.platform == "onnxruntime_onnx" for v in variants.values()), name


def test_the_backend_directory_has_every_python_based_backend(tmp_path: Path) -> None:
    """What Triton needs for backend: "grym_python": <backend-directory>/grym_python/model.py,
    and the python backend's library, stub and utils in <backend-directory>/python/, as copies (2.51 refuses a
    library whose real path leaves the backend directory). Re-assembling is idempotent and drops a file whose
    source is gone."""
    from grym_synth.inference.triton_process import PYTHON_BASED_BACKENDS, prepare_backend_dir

    assert PYTHON_BASED_BACKENDS.resolve() == (REPO / "backends").resolve()
    target = prepare_backend_dir(tmp_path / "backends")
    python = {p.name for p in (target / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"} <= python
    for name in PYTHON_BASED:
        sources = {p.name: p.read_bytes() for p in (REPO / "backends" / name).glob("*.py")}
        assert {p.name: p.read_bytes() for p in (target / name).glob("*.py")} == sources
        assert {"model.py", "onnx_runner.py"} <= set(sources)
    assert not any(p.is_symlink() for p in (target / "python").iterdir())
    (target / "grym_python" / "gone.py").write_text("# a module a newer version no longer has\n")
    prepare_backend_dir(target)
    assert not (target / "grym_python" / "gone.py").exists()


def test_a_built_repository_picks_up_template_changes_without_reexport(tmp_path: Path) -> None:
    """An up-to-date repository gets the templates' configs again; generated files stay untouched; no code is
    copied into an ONNX model's folder."""
    from grym_synth.inference.export.repository import _copy_template, _refresh_template

    built = _copy_template("unet", tmp_path)
    assert not list(built.rglob("*.py"))
    (built / "1" / "model.onnx").write_bytes(b"generated")
    (built / "config.pbtxt").write_text("stale")
    (built / "configs" / "tensorrt.pbtxt").unlink()
    assert _refresh_template("unet", tmp_path)
    assert (built / "config.pbtxt").read_text() == (REPO / "unet" / "config.pbtxt").read_text()
    variant = Path("configs") / "tensorrt.pbtxt"
    assert (built / variant).read_text() == (REPO / "unet" / variant).read_text()
    assert (built / "1" / "model.onnx").read_bytes() == b"generated"
    assert not list(built.rglob("*.py"))
    assert not _refresh_template("unet", tmp_path)
