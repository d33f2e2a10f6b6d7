"""onnxruntime session set-up shared by the python-backend ONNX models (wav2vec2 and the AudioLDM components).

Python-backend models may import nothing from the project, but they may import a module in their own version
folder (the stub puts it on ``sys.path``). server/export/repository.py therefore places this one source next to
each such model's ``1/model.py`` when it materialises a repository (``SHARED_SUPPORT``), so the session options
the configs document (``intra_op_thread_count``, ``inter_op_thread_count``, ``allow_spinning``,
``force_spinning_stop``) are read in one place.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort


def param(config: dict, key: str, default: str) -> str:
    """String value of ``parameters { key: ... }`` in the model config, or ``default``."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def session_options(config: dict) -> ort.SessionOptions:
    """Thread counts and spinning from the model config (same keys as the native onnxruntime backend)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(param(config, "intra_op_thread_count", "0"))
    options.inter_op_num_threads = int(param(config, "inter_op_thread_count", "1"))
    options.add_session_config_entry("session.intra_op.allow_spinning", param(config, "allow_spinning", "0"))
    # Spinning threads keep spinning for a while after run() returns, on cores that the next model (another
    # process) needs; stop them as soon as the run ends. Spinning within a run is what makes it faster.
    options.add_session_config_entry("session.force_spinning_stop", param(config, "force_spinning_stop", "1"))
    return options


def providers(args: dict[str, Any]) -> list[Any]:
    """CUDA when Triton placed this instance on a GPU and this onnxruntime build has it; CPU otherwise."""
    if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
