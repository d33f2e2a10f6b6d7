"""Triton Python-based backend ``grym_python``: the one Python backend every grym-synth model config names.

Installed once as ``<backend-directory>/grym_python/`` (server/grym_synth/inference/triton_process.py
``prepare_backend_dir`` for the embedded server, deploy/docker/triton.Dockerfile for NVIDIA's image); Triton runs it
through the python backend's libtriton_python.so and stub (NVIDIA's "Python-based backends": the stub puts this
folder on ``sys.path`` and imports this file as ``model``). What a model runs is decided by its folder:

* no code of its own (wav2vec2, clap_text_encoder, unet, vae_decoder, vocoder: the folder holds its configs and
  the exported ``<version>/model.onnx``): its ONNX graph on onnxruntime, :class:`onnx_runner.OnnxRuntimeModel`;
* its own ``<version>/model.py`` (the audioldm pipeline, the coordinator LLM): that file's ``TritonPythonModel``.

Why one backend and not ``python`` for the last two: Triton 2.41's python backend names each stub's shared-memory
region ``<shm-region-prefix-name><n>``, counting n per backend from 1, and a Python-based backend gets the python
backend's configuration, prefix included. The embedded server sets a prefix per server (several servers share a
host's /dev/shm), so models on ``python`` and on a Python-based backend in one server got the same region names
and crashed at load (boost::interprocess::lock_exception). One backend keeps one counter. (python_backend r24.05
names regions by random UUID, which lifts this; the configs would then be free to split again.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from onnx_runner import OnnxRuntimeModel

MODEL_FILENAME = "model.py"


def _own_model(path: str, name: str) -> Any:
    """A model folder's own ``TritonPythonModel``, imported from ``path`` under a name of its own. Its folder goes
    on ``sys.path`` as the plain python backend puts it there, so the file may import modules beside it."""
    sys.path.append(os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(f"grym_model_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


class TritonPythonModel:
    """Delegates initialize/execute/finalize to the model's own code or to the ONNX runner (module docstring)."""

    def initialize(self, args: dict[str, Any]) -> None:
        own = os.path.join(args["model_repository"], args["model_version"], MODEL_FILENAME)
        self._impl = _own_model(own, args["model_name"]) if os.path.isfile(own) else OnnxRuntimeModel()
        self._impl.initialize(args)

    def execute(self, requests: list[Any]) -> Any:
        return self._impl.execute(requests)

    def finalize(self) -> None:
        finalize = getattr(self._impl, "finalize", None)
        if finalize is not None:
            finalize()
