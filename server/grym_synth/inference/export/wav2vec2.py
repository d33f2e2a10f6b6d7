"""Wav2Vec2 exporter: a seeded (or locally loaded) ``Wav2Vec2Model`` -> ``model_dir/1/model.onnx``.

The ONNX graph takes raw 16 kHz mono audio and does the ``Wav2Vec2FeatureExtractor`` normalisation itself
(per example: ``(x - mean) / sqrt(var + 1e-7)``). Putting it in the graph means every serving path — the python
backend in the embedded Triton and the native onnxruntime/TensorRT backends in NVIDIA's containers — produces
the same numbers from the same bytes, with no client-side preprocessing to forget.

Outputs: ``features`` [batch, frames, hidden] (``last_hidden_state``) and ``embedding`` [batch, hidden] (mean of
``features`` over frames). Frame count follows from the conv feature encoder (see :func:`num_frames`); audio
shorter than :data:`MIN_SAMPLES` has zero frames and must be rejected before it reaches the model.

Why no padding anywhere: wav2vec2-base (``feat_extract_norm="group"``) normalises its first conv layer over the
whole time axis, and the in-graph input normalisation uses whole-clip statistics, so zero-padding a clip changes
its features. Batching is therefore only ever done between clips of exactly equal length.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
"""Wav2Vec2 is trained on 16 kHz mono audio; callers must resample to this before calling Triton."""

# The standard wav2vec2 conv feature encoder (identical for base/large and for our tiny profile).
CONV_KERNEL: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)

NORM_EPS = 1e-7
"""``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`` epsilon (added to the variance)."""

ONNX_OPSET = 17
WARMUP_FILE = "audio_1s.f32"
"""Raw little-endian float32 samples under ``model_dir/warmup/``, referenced by model_warmup in every config
variant (Triton's ``random_data`` is random bytes, i.e. NaN/Inf floats, which the model rejects)."""
INPUT_NAME = "audio"
OUTPUT_NAMES = ("features", "embedding")

# Self-verification bounds (max |ORT - PyTorch| over features and embedding, float32 CPU, batch 2 at 16000 and
# 12345 samples). Measured with seeded weights (ORT 1.32, torch 2.13, 2-core Xeon): tiny 4.3e-6, base 5.7e-6.
# The outputs are layer-normed (O(1)), so real checkpoints should land in a similar range (not measured: no hub
# access here). The bounds leave 20-200x headroom for other CPUs/ORT kernels and stay far below what a wrong
# graph produces (e.g. different normalisation statistics move features by ~0.3 on average).
PARITY_BOUND = {"tiny": 1e-4, "base": 1e-3}


def receptive_field(kernels: Sequence[int] = CONV_KERNEL, strides: Sequence[int] = CONV_STRIDE) -> int:
    """Samples one output frame sees; also the shortest input that yields a frame (400 for wav2vec2)."""
    field = 1
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        field = (field - 1) * stride + kernel
    return field


def hop_length(strides: Sequence[int] = CONV_STRIDE) -> int:
    """Samples between consecutive frames (320 = 20 ms at 16 kHz)."""
    return int(np.prod(strides))


def num_frames(num_samples: int, kernels: Sequence[int] = CONV_KERNEL, strides: Sequence[int] = CONV_STRIDE) -> int:
    """Frames the conv encoder produces for ``num_samples`` samples (same arithmetic as
    ``Wav2Vec2Model._get_feat_extract_output_lengths``: ``floor((L - k) / s) + 1`` per layer, 0 if too short)."""
    length = int(num_samples)
    for kernel, stride in zip(kernels, strides):
        if length < kernel:
            return 0
        length = (length - kernel) // stride + 1
    return length


MIN_SAMPLES = receptive_field()
"""Shortest accepted clip (400 samples = 25 ms). Shorter audio has 0 frames: the mean embedding is undefined."""
HOP_LENGTH = hop_length()
FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH  # 50.0

assert num_frames(MIN_SAMPLES) == 1 and num_frames(MIN_SAMPLES - 1) == 0


@dataclass(frozen=True)
class _Profile:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    conv_dim: tuple[int, ...]
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int


PROFILES: dict[str, _Profile] = {
    # Real architecture, toy widths: builds and exports in ~1 s; keeps group norm, pos-conv, 320x downsampling.
    "tiny": _Profile(32, 2, 2, 64, (32,) * 7, 16, 4),
    # facebook/wav2vec2-base == Wav2Vec2Config() defaults (94,371,712 parameters in Wav2Vec2Model).
    "base": _Profile(768, 12, 12, 3072, (512,) * 7, 128, 16),
}
# The repository builder passes one profile to every exporter; "full" (real AudioLDM sizes) means the real
# wav2vec2 size, i.e. base.
PROFILE_ALIASES = {"full": "base"}


def resolve_profile(profile: str) -> str:
    """Canonical wav2vec2 profile name ("full" -> "base"); ValueError for unknown names."""
    name = PROFILE_ALIASES.get(profile, profile)
    if name not in PROFILES:
        known = sorted(PROFILES) + sorted(PROFILE_ALIASES)
        raise ValueError(f"unknown wav2vec2 profile {profile!r}; expected one of {known}")
    return name


def build_config(profile: str) -> Any:
    """``Wav2Vec2Config`` for a profile. Eager attention so the traced ONNX graph is plain MatMul/Softmax."""
    from transformers import Wav2Vec2Config

    p = PROFILES[resolve_profile(profile)]
    config = Wav2Vec2Config(
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        intermediate_size=p.intermediate_size,
        conv_dim=list(p.conv_dim),
        conv_kernel=list(CONV_KERNEL),
        conv_stride=list(CONV_STRIDE),
        conv_bias=False,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=p.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=p.num_conv_pos_embedding_groups,
    )
    config._attn_implementation = "eager"
    return config


def build_model(profile: str, weights: Path | None, seed: int) -> Any:
    """Seeded model from the profile config, or a local checkpoint (never a hub id). Returned in eval()."""
    import torch
    from transformers import Wav2Vec2Model

    if weights is not None:
        weights = Path(weights)
        if not weights.is_dir():
            raise FileNotFoundError(f"wav2vec2 weights dir {weights} does not exist")
        model = Wav2Vec2Model.from_pretrained(str(weights), local_files_only=True, attn_implementation="eager")
    else:
        torch.manual_seed(seed)
        model = Wav2Vec2Model(build_config(profile))
    model.eval()
    _check_conv_stack(model.config)
    return model


def _check_conv_stack(config: Any) -> None:
    """Everything downstream (MIN_SAMPLES, frame counts in the orchestrator) assumes the standard conv stack."""
    if tuple(config.conv_kernel) != CONV_KERNEL or tuple(config.conv_stride) != CONV_STRIDE:
        raise ValueError(
            f"unsupported conv feature encoder kernel={config.conv_kernel} stride={config.conv_stride}; "
            f"expected {CONV_KERNEL}/{CONV_STRIDE}"
        )


def _wrapper(model: Any) -> Any:
    """nn.Module: raw audio -> (features, embedding) with the feature-extractor normalisation inside."""
    import torch

    class Wav2Vec2Embedder(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mean = audio.mean(dim=1, keepdim=True)
            centred = audio - mean
            var = (centred * centred).mean(dim=1, keepdim=True)  # population variance, like np.var
            normed = centred / torch.sqrt(var + NORM_EPS)
            features = self.inner(normed).last_hidden_state
            return features, features.mean(dim=1)

    return Wav2Vec2Embedder(model).eval()


def reference_outputs(model: Any, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch reference through the *HF* preprocessing path (Wav2Vec2FeatureExtractor, then the model), so the
    self-check validates the in-graph normalisation too, not just the transformer."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    inputs = extractor(list(audio), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    with torch.inference_mode():
        features = model(inputs["input_values"]).last_hidden_state
    return features.numpy(), features.mean(dim=1).numpy()


def _onnx_export(model: Any, path: Path) -> None:
    """Legacy TorchScript exporter (torch 2.13 without onnxscript: the dynamo exporter is unavailable)."""
    import warnings

    import torch

    example = torch.zeros(1, SAMPLE_RATE, dtype=torch.float32)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from HF shape checks; the parity check is the real guard
        torch.onnx.export(
            _wrapper(model),
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch", 1: "samples"},
                OUTPUT_NAMES[0]: {0: "batch", 1: "frames"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
            do_constant_folding=True,
        )


def _stamp_metadata(path: Path, meta: dict[str, str]) -> None:
    """Record the conv arithmetic in the ONNX file so model.py validates lengths from the graph it serves,
    not from a constant that could drift from the exported model."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def onnx_session(path: Path, intra_op_threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def verify_onnx(model: Any, path: Path, seed: int, lengths: Sequence[int] = (SAMPLE_RATE, 12_345)) -> float:
    """Max |ORT - PyTorch| over both outputs for a batch of 2 at each length; also checks frame counts."""
    session = onnx_session(path)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for length in lengths:
        audio = (0.1 * rng.standard_normal((2, length))).astype(np.float32)
        ref_features, ref_embedding = reference_outputs(model, audio)
        features, embedding = session.run(list(OUTPUT_NAMES), {INPUT_NAME: audio})
        if features.shape != (2, num_frames(length), model.config.hidden_size):
            raise RuntimeError(f"ONNX features shape {features.shape} for {length} samples; expected frames "
                               f"{num_frames(length)}")
        diffs = (np.abs(features - ref_features).max(), np.abs(embedding - ref_embedding).max())
        worst = max(worst, *(float(d) for d in diffs))
    return worst


def write_warmup_sample(model_dir: Path, seed: int) -> Path:
    """1 s of seeded noise at a speech-like level for the configs' model_warmup (deterministic bytes)."""
    warmup_dir = Path(model_dir) / "warmup"
    warmup_dir.mkdir(parents=True, exist_ok=True)
    noise = 0.1 * np.random.default_rng(seed).standard_normal(SAMPLE_RATE)
    path = warmup_dir / WARMUP_FILE
    path.write_bytes(noise.astype("<f4").tobytes())
    return path


def export(profile: str, model_dir: Path, weights: Path | None = None, seed: int = 0) -> dict:
    """Write ``model_dir/1/model.onnx`` and ``model_dir/warmup/audio_1s.f32``; return manifest metadata."""
    started = time.perf_counter()
    profile = resolve_profile(profile)
    model_dir = Path(model_dir)
    model = build_model(profile, weights, seed)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"

    _onnx_export(model, onnx_path)
    hidden = int(model.config.hidden_size)
    _stamp_metadata(
        onnx_path,
        {
            "min_samples": str(MIN_SAMPLES),
            "hop_length": str(HOP_LENGTH),
            "sample_rate": str(SAMPLE_RATE),
            "embedding_dim": str(hidden),
            "profile": profile,
        },
    )

    write_warmup_sample(model_dir, seed)
    max_diff = verify_onnx(model, onnx_path, seed)
    # A checkpoint may be any size (e.g. real base weights under the tiny profile): use the loose bound.
    bound = PARITY_BOUND[profile] if weights is None else PARITY_BOUND["base"]
    log.info("wav2vec2[%s] ONNX vs PyTorch max abs diff %.3g (bound %.0e)", profile, max_diff, bound)
    print(f"wav2vec2[{profile}]: ONNX vs PyTorch max abs diff {max_diff:.3g} (bound {bound:.0e})", file=sys.stderr)
    if not max_diff <= bound:
        raise RuntimeError(f"wav2vec2 ONNX export diverges from PyTorch: max abs diff {max_diff:.3g} > {bound:.0e}")

    return {
        "embedding_dim": hidden,
        "sample_rate": SAMPLE_RATE,
        "profile": profile,
        "weights": str(weights) if weights is not None else None,
        "seed": None if weights is not None else seed,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "onnx_max_abs_diff": max_diff,
        "onnx_bytes": onnx_path.stat().st_size,
        "min_samples": MIN_SAMPLES,
        "hop_length": HOP_LENGTH,
        "frames_per_second": FRAMES_PER_SECOND,
        "conv_kernel": list(CONV_KERNEL),
        "conv_stride": list(CONV_STRIDE),
        "inputs": {INPUT_NAME: ["batch", "samples"]},
        "outputs": {OUTPUT_NAMES[0]: ["batch", "frames", hidden], OUTPUT_NAMES[1]: ["batch", hidden]},
        "export_seconds": round(time.perf_counter() - started, 2),
    }
