"""The ONNX half of the ``grym_python`` backend: one ONNX graph on onnxruntime, batched across requests.

model.py (the backend's entry point) hands every model whose folder has no code of its own to
:class:`OnnxRuntimeModel`: wav2vec2 and the AudioLDM components (clap_text_encoder, unet, vae_decoder, vocoder).
Everything model-specific comes from the model: input/output names and dtypes from its configuration, the graph
from ``<model folder>/<version>/model.onnx`` (written by server/grym_synth/inference/export/), and an optional
length floor from the graph's ``min_samples`` metadata (wav2vec2: one conv receptive field, 400 samples).

Batching: the dynamic batcher hands ``execute()`` several requests. Requests whose inputs have identical per-row
shapes (UNet steps of concurrent generations of one duration, wav2vec2 clips of one length) are concatenated along
the batch axis and run through onnxruntime once; outputs are split back, one response per request. Requests of
another shape form their own group (wav2vec2's config sets ``allow_ragged_batch`` so clips of different lengths
may share an ``execute()``). Nothing is ever padded: wav2vec2 normalises over the whole clip (GroupNorm over time
in its first conv, whole-clip mean/variance in-graph) and the VAE/UNet convolutions see the borders, so padding
would change results.

Row parallelism (config parameter ``row_parallelism``, default "1"): with P > 1 a batch of at least P rows is cut
into P slices that run at the same time, each on its own share of the cores (threads // P), instead of one run
over all cores. Rows are independent, so the result is the same rows; what changes is how the cores are used.
Small graphs with many small operators (the tiny UNet) lose a quarter of two cores to the hand-offs between
intra-op threads at every operator; two single-threaded runs side by side have none. Measured on 2 cores (tiny
UNet, 1 s latents): 5.8 ms per row as one 2-thread run of a CFG pair, 4.2 ms as two 1-thread runs; the full
UNet gains 2%, so the models that do not gain keep it off. Batches smaller than P use the all-cores session.

Models without a batch axis (``max_batch_size: 0``; silero_vad, whose recurrent state travels in the request)
are never concatenated: each request is one run of its own, and its inputs need not agree on a first axis.

A malformed request (missing input, rank mismatch, batch mismatch between its inputs, an empty batch, shorter than
``min_samples``, non-finite values) gets its own INVALID_ARG response; the rest of the batch is still served.
Optional config parameters (the keys of Triton's native onnxruntime backend where it has them):
``intra_op_thread_count`` (0 = one per core), ``inter_op_thread_count`` (default 1), ``allow_spinning`` ("0"/"1"),
``force_spinning_stop`` ("1"/"0"), ``row_parallelism`` (see above).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_FILENAME = "model.onnx"
# Graph metadata: the shortest last axis (samples) an input may have; requests below it are rejected alone.
MIN_SAMPLES_KEY = "min_samples"


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


class OnnxRuntimeModel:
    """One onnxruntime session per model instance; see the module docstring for the batching contract."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self._name = config["name"]
        self._batched = int(config.get("max_batch_size", 0)) > 0
        self._inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self._output_names = [o["name"] for o in config["output"]]
        self._output_dtypes = [pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], ONNX_FILENAME)
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(f"{path} is missing; build the repository (grym-synth export)")
        placement = providers(args)
        self._session = ort.InferenceSession(path, sess_options=session_options(config), providers=placement)
        self._ranks = self._check_signature(path)
        metadata = self._session.get_modelmeta().custom_metadata_map
        self._min_samples = int(metadata.get(MIN_SAMPLES_KEY, "0"))
        self._logger = pb_utils.Logger
        self._slices, self._pool = self._row_parallel_sessions(config, path, placement)

    def _row_parallel_sessions(self, config: dict, path: str, placement: list[Any]
                               ) -> tuple[list[ort.InferenceSession], ThreadPoolExecutor | None]:
        """Sessions for the P concurrent row slices (see the module docstring), or none when P is 1 or on a GPU.

        A session's intra-op thread pool is shared by concurrent runs, so slices with several threads each need
        their own session; single-threaded runs execute in the calling thread and can share one session."""
        cores = len(os.sched_getaffinity(0))
        threads = int(param(config, "intra_op_thread_count", "0")) or cores
        parallel = min(int(param(config, "row_parallelism", "1")), threads)
        if parallel <= 1 or placement[0] != "CPUExecutionProvider":
            return [], None
        options = session_options(config)
        options.intra_op_num_threads = threads // parallel
        count = 1 if options.intra_op_num_threads == 1 else parallel
        sessions = [ort.InferenceSession(path, sess_options=options, providers=placement) for _ in range(count)]
        return sessions * (parallel // count), ThreadPoolExecutor(parallel, thread_name_prefix=f"{self._name}-rows")

    def _run(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``batch``: one run over all cores, or row slices run side by side and re-joined."""
        rows = next(iter(batch.values())).shape[0]
        if self._pool is None or rows < len(self._slices):
            return self._session.run(self._output_names, batch)
        bounds = np.linspace(0, rows, len(self._slices) + 1).astype(int)
        futures = [
            self._pool.submit(session.run, self._output_names, {name: a[lo:hi] for name, a in batch.items()})
            for session, lo, hi in zip(self._slices, bounds[:-1], bounds[1:])
        ]
        parts = [future.result() for future in futures]
        return [np.concatenate([part[i] for part in parts]) for i in range(len(self._output_names))]

    def _check_signature(self, path: str) -> dict[str, int]:
        """Fail loading (not the first request) when config and graph disagree; returns each input's rank."""
        onnx_inputs = {i.name: len(i.shape) for i in self._session.get_inputs()}
        onnx_outputs = {o.name for o in self._session.get_outputs()}
        names = [name for name, _ in self._inputs]
        missing = (set(names) - set(onnx_inputs)) | (set(self._output_names) - onnx_outputs)
        if missing or len(names) != len(onnx_inputs):
            raise pb_utils.TritonModelException(
                f"{self._name}: config tensors {names} -> {self._output_names} do not match {path} "
                f"(inputs {sorted(onnx_inputs)}, outputs {sorted(onnx_outputs)})"
            )
        return onnx_inputs

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        """The request's inputs as numpy arrays (batch axis first), or ValueError saying what is wrong."""
        feeds: dict[str, np.ndarray] = {}
        for name, dtype in self._inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input '{name}'")
            array = tensor.as_numpy()
            if array.ndim != self._ranks[name]:
                raise ValueError(f"'{name}' must have rank {self._ranks[name]}, got shape {list(array.shape)}")
            if array.ndim >= 2 and array.shape[-1] < self._min_samples:
                raise ValueError(f"'{name}' has {array.shape[-1]} samples; at least {self._min_samples} "
                                 f"(the graph's {MIN_SAMPLES_KEY}) are required")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"'{name}' contains NaN or infinite values")
            feeds[name] = array.astype(dtype, copy=False)
        batches = {array.shape[0] for array in feeds.values()}
        if self._batched and (len(batches) != 1 or 0 in batches):
            raise ValueError(f"inputs disagree on (or have an empty) batch size: {sorted(batches)}")
        return feeds

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except ValueError as exc:
                error = pb_utils.TritonError(f"{self._name}: {exc}", pb_utils.TritonError.INVALID_ARG)
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            key = tuple(array.shape[1:] for array in feeds.values()) if self._batched else (index,)
            groups.setdefault(key, []).append((index, feeds))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]], responses: list[Any]) -> None:
        """One ORT run for requests of equal per-row shapes; fills their slots in ``responses``."""
        if len(members) == 1:
            batch = members[0][1]
        else:
            batch = {name: np.concatenate([feeds[name] for _, feeds in members]) for name, _ in self._inputs}
        try:
            outputs = self._run(batch)
        except Exception as exc:  # an ORT failure fails this group only, never the whole execute()
            shapes = {name: list(array.shape) for name, array in batch.items()}
            self._logger.log_error(f"{self._name} onnxruntime run failed for {shapes}: {exc}")
            for index, _ in members:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self._name} inference failed: {exc}")
                )
            return
        offset = 0
        first = self._inputs[0][0]
        for index, feeds in members:
            rows = slice(offset, offset + feeds[first].shape[0]) if self._batched else slice(None)
            offset = rows.stop
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[rows], dtype=dtype))
                for name, output, dtype in zip(self._output_names, outputs, self._output_dtypes)
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._session = None
        self._slices = []
