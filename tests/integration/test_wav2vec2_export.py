"""Wav2Vec2 exporter: ONNX parity with PyTorch/HF preprocessing, determinism, frame arithmetic, config templates.

All on the tiny profile (real Wav2Vec2Model architecture, toy widths) so the module runs in ~20 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnxruntime = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from grym_synth.inference.export import wav2vec2 as w2v  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[2] / "model_repository" / "wav2vec2"
SEED = 1234
TOL = 1e-4  # tiny-profile parity bound; measured max diff ~5e-6


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    model_dir = tmp_path_factory.mktemp("w2v") / "wav2vec2"
    meta = w2v.export("tiny", model_dir, None, SEED)
    return meta, model_dir


@pytest.fixture(scope="module")
def session(exported: tuple[dict, Path]):
    return w2v.onnx_session(exported[1] / "1" / "model.onnx")


@pytest.fixture(scope="module")
def torch_model():
    return w2v.build_model("tiny", None, SEED)


def _audio(rng: np.random.Generator, batch: int, samples: int) -> np.ndarray:
    return (0.2 * rng.standard_normal((batch, samples))).astype(np.float32)


def test_meta_describes_the_export(exported: tuple[dict, Path], torch_model) -> None:
    meta, model_dir = exported
    assert (model_dir / "1" / "model.onnx").stat().st_size == meta["onnx_bytes"]
    assert meta["embedding_dim"] == torch_model.config.hidden_size == 32
    assert meta["sample_rate"] == 16000
    assert meta["profile"] == "tiny"
    assert meta["parameters"] == sum(p.numel() for p in torch_model.parameters())
    assert 0.0 <= meta["onnx_max_abs_diff"] <= TOL
    assert meta["min_samples"] == w2v.MIN_SAMPLES == 400
    assert meta["hop_length"] == 320 and meta["frames_per_second"] == 50.0
    warmup = model_dir / "warmup" / w2v.WARMUP_FILE
    samples = np.frombuffer(warmup.read_bytes(), dtype="<f4")
    assert samples.shape == (16000,) and np.isfinite(samples).all() and samples.std() > 0.01


def test_tiny_keeps_the_wav2vec2_base_feature_encoder(torch_model) -> None:
    cfg = torch_model.config
    assert cfg.feat_extract_norm == "group" and not cfg.do_stable_layer_norm
    assert tuple(cfg.conv_kernel) == w2v.CONV_KERNEL and tuple(cfg.conv_stride) == w2v.CONV_STRIDE
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 2, 2)


def test_base_profile_is_wav2vec2_base_size() -> None:
    """facebook/wav2vec2-base's Wav2Vec2Model has 94,371,712 parameters."""
    from transformers import Wav2Vec2Config

    config = w2v.build_config("base")
    defaults = Wav2Vec2Config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "feat_extract_norm"):
        mine, default = getattr(config, key), getattr(defaults, key)
        assert (list(mine) if isinstance(mine, (list, tuple)) else mine) == (
            list(default) if isinstance(default, (list, tuple)) else default
        ), key
    with torch.device("meta"):  # shapes only: no 376 MB allocation, no init time
        from transformers import Wav2Vec2Model

        model = Wav2Vec2Model(config)
    assert sum(p.numel() for p in model.parameters()) == 94_371_712
    assert w2v.resolve_profile("full") == "base"
    with pytest.raises(ValueError, match="unknown wav2vec2 profile"):
        w2v.resolve_profile("huge")


@pytest.mark.parametrize(("batch", "samples"), [(1, 400), (1, 16000), (3, 12345), (2, 40000), (5, 3200)])
def test_onnx_matches_pytorch_with_hf_preprocessing(session, torch_model, batch: int, samples: int) -> None:
    """ORT on raw audio == Wav2Vec2FeatureExtractor + Wav2Vec2Model in PyTorch (normalisation is in the graph)."""
    audio = _audio(np.random.default_rng(samples + batch), batch, samples) + 0.05  # DC offset: mean matters
    ref_features, ref_embedding = w2v.reference_outputs(torch_model, audio)
    features, embedding = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: audio})
    assert features.shape == (batch, w2v.num_frames(samples), 32)
    assert embedding.shape == (batch, 32)
    np.testing.assert_allclose(features, ref_features, atol=TOL, rtol=0)
    np.testing.assert_allclose(embedding, ref_embedding, atol=TOL, rtol=0)
    np.testing.assert_allclose(embedding, features.mean(axis=1), atol=1e-6, rtol=0)


def test_onnx_normalises_each_example_independently(session) -> None:
    """Scaling/shifting one clip must not change its features (per-example zero-mean/unit-variance in-graph),
    and a batch row must equal the same clip run alone."""
    rng = np.random.default_rng(7)
    clip = _audio(rng, 1, 8000)
    other = _audio(rng, 1, 8000)
    alone, _ = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: clip})
    scaled, _ = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: 3.0 * clip + 0.5})
    batched, _ = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: np.concatenate([other, clip])})
    np.testing.assert_allclose(scaled, alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(batched[1:], alone, atol=1e-5, rtol=0)


def test_zero_padding_changes_features(session) -> None:
    """Why the model batches by exact length: padding a clip with zeros changes its (unpadded) frames."""
    clip = _audio(np.random.default_rng(3), 1, 16000)
    padded = np.concatenate([clip, np.zeros((1, 8000), np.float32)], axis=1)
    alone, _ = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: clip})
    with_pad, _ = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: padded})
    assert np.abs(with_pad[:, : alone.shape[1]] - alone).max() > 1e-2


def test_same_seed_gives_identical_onnx_bytes(exported: tuple[dict, Path], tmp_path: Path) -> None:
    _, model_dir = exported
    again = tmp_path / "again"
    other = tmp_path / "other"
    w2v.export("tiny", again, None, SEED)
    w2v.export("tiny", other, None, SEED + 1)
    original = (model_dir / "1" / "model.onnx").read_bytes()
    assert (again / "1" / "model.onnx").read_bytes() == original
    assert (other / "1" / "model.onnx").read_bytes() != original
    assert (again / "warmup" / w2v.WARMUP_FILE).read_bytes() == (model_dir / "warmup" / w2v.WARMUP_FILE).read_bytes()


def test_local_weights_dir_is_loaded(tmp_path: Path) -> None:
    """--weights DIR: the exported graph carries the checkpoint's weights, not seeded ones."""
    source = w2v.build_model("tiny", None, 99)
    source.save_pretrained(tmp_path / "ckpt")
    meta = w2v.export("tiny", tmp_path / "model", tmp_path / "ckpt", SEED)
    assert meta["weights"] == str(tmp_path / "ckpt") and meta["seed"] is None
    audio = _audio(np.random.default_rng(0), 2, 6000)
    features, _ = w2v.onnx_session(tmp_path / "model" / "1" / "model.onnx").run(None, {"audio": audio})
    ref_features, _ = w2v.reference_outputs(source, audio)
    np.testing.assert_allclose(features, ref_features, atol=TOL, rtol=0)
    with pytest.raises(FileNotFoundError):
        w2v.export("tiny", tmp_path / "nope", tmp_path / "missing", SEED)


def test_frame_arithmetic_matches_the_model(session, torch_model) -> None:
    assert w2v.num_frames(16000) == 49
    assert w2v.num_frames(w2v.MIN_SAMPLES) == 1 and w2v.num_frames(w2v.MIN_SAMPLES - 1) == 0
    assert w2v.num_frames(0) == 0
    lengths = [400, 401, 719, 720, 721, 1000, 4321, 16000, 16319, 16320, 48000]
    hf = torch_model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
    assert [w2v.num_frames(n) for n in lengths] == hf
    for n in lengths:
        features, _ = session.run(list(w2v.OUTPUT_NAMES), {w2v.INPUT_NAME: np.ones((1, n), np.float32)})
        assert features.shape[1] == w2v.num_frames(n), n
        assert w2v.num_frames(n) == (n - 400) // 320 + 1  # closed form for the standard stack


def test_onnx_metadata_carries_the_length_contract(session) -> None:
    meta = session.get_modelmeta().custom_metadata_map
    assert int(meta["min_samples"]) == w2v.MIN_SAMPLES
    assert int(meta["sample_rate"]) == w2v.SAMPLE_RATE
    assert int(meta["embedding_dim"]) == 32


def _configs() -> list[Path]:
    return sorted(TEMPLATE.rglob("*.pbtxt"))


def test_all_three_config_variants_exist() -> None:
    names = {p.relative_to(TEMPLATE).as_posix() for p in _configs()}
    assert names == {"config.pbtxt", "configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt"}


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.relative_to(TEMPLATE).as_posix())
def test_config_parses_and_matches_the_graph(path: Path, session) -> None:
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert config.name == "wav2vec2"
    assert config.max_batch_size == 16
    assert [i.name for i in config.input] == [i.name for i in session.get_inputs()] == ["audio"]
    assert [o.name for o in config.output] == [o.name for o in session.get_outputs()] == ["features", "embedding"]
    assert list(config.input[0].dims) == [-1]
    assert [list(o.dims) for o in config.output] == [[-1, -1], [-1]]
    assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in [*config.input, *config.output])
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    (warmup,) = config.model_warmup
    sample = warmup.inputs["audio"]
    assert sample.input_data_file == w2v.WARMUP_FILE and list(sample.dims) == [16000]
    if path.name == "config.pbtxt":
        assert config.backend == "grym_python"
        assert config.input[0].allow_ragged_batch  # the backend groups mixed lengths itself
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert int(config.parameters["intra_op_thread_count"].string_value) >= 0
    else:
        assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
        assert not config.input[0].allow_ragged_batch  # native batcher: identical shapes only
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    if path.name == "tensorrt.pbtxt":
        (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt"
        assert trt.parameters["precision_mode"] == "FP16"
        assert int(trt.parameters["max_workspace_size_bytes"]) > 0
        assert trt.parameters["trt_profile_min_shapes"] == f"audio:1x{w2v.MIN_SAMPLES}"
