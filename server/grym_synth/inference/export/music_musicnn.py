"""musicnn exporter: the package's MTT_musicnn and MTT_vgg TF1 checkpoints -> one ``model_dir/1/model.onnx``
through tf2onnx, run once in a throwaway TensorFlow venv; with musicnn's own extractor output as the stored reference.

Why a throwaway venv (and not a PyTorch re-implementation): musicnn 0.1.0 (ISC) ships TF1 checkpoints; reading them
and building its graph needs TensorFlow <= 2.15 (the ``tf.compat.v1.layers`` API), and TensorFlow 2.15 needs
protobuf < 5 while grym-synth needs protobuf 6 (tritonclient, pymilvus). Converting musicnn's *own* graph with
tf2onnx keeps every layer (batch-norm epsilons, padding, pooling order) exactly as trained — measured here: ONNX vs
TensorFlow max |diff| 2e-7 on the taggram, 1.9e-6 on the timbre — while a re-implementation would have to prove
each of those again and still needs TensorFlow to read the checkpoint. TensorFlow is used at export time only;
serving is ONNX Runtime.

The venv (:data:`VENV_PACKAGES`, ~1.8 GB, ~2 min to install from PyPI) is created on first use under
``$GRYM_MUSICNN_EXPORT_VENV`` (default ``~/.cache/grym-synth/musicnn-export-venv``; scripts/setup.sh creates it
ahead of time). Its converted output is cached inside it, keyed by the conversion script and the reference clip,
so later builds (every test session builds a fresh repository) copy instead of converting again.

The reference: musicnn's ``extractor`` (TensorFlow, in the venv) runs on a deterministic 12-second synthetic clip
(:func:`reference_clip`); ``model_dir/reference/`` keeps the clip and ``reference.npz`` (both taggrams, per-patch
penultimate, per-patch timbral means, the extractor's patches), which the export parity check and
tests/integration/test_music_models.py compare served outputs against.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VENV_ENV = "GRYM_MUSICNN_EXPORT_VENV"
DEFAULT_VENV = Path("~/.cache/grym-synth/musicnn-export-venv")
# What the throwaway venv holds; musicnn itself goes in with --no-deps (it pins numpy < 1.17 and TensorFlow 1).
VENV_PACKAGES = ("tensorflow-cpu==2.15.1", "tf2onnx==1.16.1", "numpy<2", "librosa==0.11.0", "soundfile")
VENV_NODEPS = ("musicnn==0.1.0",)
VENV_READY = ".grym-ready-v1"
SCRIPT = Path(__file__).with_name("music_musicnn_tf.py")
REFERENCE_DIR = "reference"
REFERENCE_CLIP = "clip.wav"
REFERENCE_NPZ = "reference.npz"
REFERENCE_SECONDS = 12
SAMPLE_RATE = 16_000
# ONNX (onnxruntime) vs TensorFlow on the reference patches; measured 1.9e-6.
PARITY_BOUND = 1e-5
INSTALL_TIMEOUT_S = 1800
CONVERT_TIMEOUT_S = 900


def venv_dir() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()


def ensure_venv() -> Path:
    """The TensorFlow export venv's python, creating the venv when it is missing or half-built."""
    root = venv_dir()
    python = root / "bin" / "python"
    if (root / VENV_READY).exists() and python.exists():
        return python
    log.info("creating the musicnn export venv in %s (TensorFlow %s; a few minutes, once)", root, VENV_PACKAGES[0])
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(root)], check=True, timeout=INSTALL_TIMEOUT_S)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *VENV_PACKAGES], check=True, timeout=INSTALL_TIMEOUT_S)
    subprocess.run([*pip, "--no-deps", *VENV_NODEPS], check=True, timeout=INSTALL_TIMEOUT_S)
    (root / VENV_READY).write_text("\n".join(VENV_PACKAGES + VENV_NODEPS) + "\n")
    return python


def reference_clip(seconds: int = REFERENCE_SECONDS, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic 12 s clip with pitched, decaying chords and a little noise: 4 musicnn patches."""
    t = np.arange(seconds * rate) / rate
    chord = sum(0.2 * np.sin(2 * np.pi * f * k * t) / k for f in (220.0, 277.18, 329.63) for k in range(1, 5))
    audio = chord * np.exp(-0.2 * (t % 3)) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return audio.astype(np.float32)


def _cache_key(clip: np.ndarray) -> str:
    digest = hashlib.sha256(SCRIPT.read_bytes())
    digest.update(clip.tobytes())
    digest.update("|".join(VENV_PACKAGES + VENV_NODEPS).encode())
    return digest.hexdigest()[:16]


def convert(work: Path) -> Path:
    """``model.onnx``, ``reference.npz`` and ``clip.wav`` in a cache folder inside the venv (converted once)."""
    import soundfile as sf

    python = ensure_venv()
    clip = reference_clip()
    cache = venv_dir() / f"grym-musicnn-{_cache_key(clip)}"
    if (cache / "model.onnx").exists() and (cache / REFERENCE_NPZ).exists():
        return cache
    tmp = Path(tempfile.mkdtemp(dir=work))
    sf.write(tmp / REFERENCE_CLIP, clip, SAMPLE_RATE, subtype="FLOAT")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), str(SCRIPT), str(tmp), str(tmp / REFERENCE_CLIP)], env=env,
                          capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"musicnn conversion failed ({done.returncode}):\n{done.stderr[-4000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    shutil.move(str(tmp), str(cache))
    return cache


def export(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """Convert (or take from the cache) and install into ``model_dir``; check ONNX against TensorFlow."""
    import onnxruntime as ort

    from grym_synth.inference.music_models import MUSICNN_EMBEDDING, MUSICNN_OUTPUTS

    model_dir = Path(model_dir)
    cache = convert(model_dir)
    shutil.copyfile(cache / "model.onnx", model_dir / "1" / "model.onnx")
    reference = model_dir / REFERENCE_DIR
    reference.mkdir(exist_ok=True)
    for name in (REFERENCE_CLIP, REFERENCE_NPZ):
        shutil.copyfile(cache / name, reference / name)
    data = np.load(reference / REFERENCE_NPZ)
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(MUSICNN_OUTPUTS, session.run(list(MUSICNN_OUTPUTS), {"patches": data["batch"]})))
    diff = max(float(np.abs(got[name] - data[name]).max()) for name in MUSICNN_OUTPUTS)
    if not diff <= PARITY_BOUND:
        raise RuntimeError(f"musicnn: ONNX differs from TensorFlow by {diff:.3g} (> {PARITY_BOUND})")
    log.info("musicnn export parity vs TensorFlow %s: max |diff| %.3g", data["tensorflow"], diff)
    return {"source": "musicnn 0.1.0 MTT_musicnn + MTT_vgg (TF1 checkpoints, tf2onnx)", "trained": True,
            "tensorflow": str(data["tensorflow"]), "parity_max_abs_diff": diff, "labels": 50, "embedding": 200,
            "timbre": MUSICNN_EMBEDDING}
