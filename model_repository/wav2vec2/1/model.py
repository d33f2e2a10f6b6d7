"""Triton python-backend model: wav2vec2 ONNX graph on onnxruntime with exact-length request grouping.

Why grouping and not padding: wav2vec2-base normalises its first conv layer with GroupNorm over the whole time
axis, and the ONNX graph normalises each clip with its own mean/variance. Zero-padding a clip to a longer
length therefore changes all of its features, so a padded batch would silently differ from the same request
sent alone. config.pbtxt sets ``allow_ragged_batch`` so the dynamic batcher may hand ``execute()`` requests of
different lengths; they are grouped by sample count, each group is concatenated along the batch axis and run
through onnxruntime once, and the outputs are split back into one response per request.

A request whose tensor is unusable (wrong rank, empty batch, shorter than the conv receptive field, non-finite
samples) gets its own error response; the rest of the batch is still served. The minimum length comes from
the ONNX file's metadata (written by server/export/wav2vec2.py), so it always matches the graph being served.

Tensor names and dtypes come from the model configuration; the ONNX file is loaded from
``<model_repository>/<version>/model.onnx``. Optional config parameters (the session ones read by
ort_session.py, placed beside this file): ``intra_op_thread_count``,
``inter_op_thread_count`` (default 1), ``allow_spinning`` ("0"/"1") and ``force_spinning_stop`` ("1"/"0").
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from ort_session import providers, session_options

ONNX_FILENAME = "model.onnx"


class TritonPythonModel:
    """One onnxruntime session per model instance; see module docstring for the batching contract."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        if len(config["input"]) != 1:
            raise pb_utils.TritonModelException("wav2vec2 expects exactly one input (raw audio)")
        self._input_name: str = config["input"][0]["name"]
        self._output_names: list[str] = [output["name"] for output in config["output"]]
        self._output_dtypes = [pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]]

        path = os.path.join(args["model_repository"], args["model_version"], ONNX_FILENAME)
        self._session = ort.InferenceSession(path, sess_options=session_options(config), providers=providers(args))
        self._check_signature(path)
        metadata = self._session.get_modelmeta().custom_metadata_map
        if "min_samples" not in metadata:
            raise pb_utils.TritonModelException(f"{path} lacks 'min_samples' metadata; re-export it")
        self._min_samples = int(metadata["min_samples"])
        self._logger = pb_utils.Logger

    def _check_signature(self, path: str) -> None:
        """Fail loading (not the first request) when config and graph disagree on tensor names."""
        onnx_inputs = {i.name for i in self._session.get_inputs()}
        onnx_outputs = {o.name for o in self._session.get_outputs()}
        missing = ({self._input_name} - onnx_inputs) | (set(self._output_names) - onnx_outputs)
        if missing:
            raise pb_utils.TritonModelException(
                f"config tensors {sorted(missing)} not in {path} (inputs {sorted(onnx_inputs)}, "
                f"outputs {sorted(onnx_outputs)})"
            )

    def _validated_audio(self, request: Any) -> np.ndarray:
        """The request's [batch, samples] float32 audio, or ValueError saying what is wrong with it."""
        tensor = pb_utils.get_input_tensor_by_name(request, self._input_name)
        if tensor is None:
            raise ValueError(f"missing input '{self._input_name}'")
        audio = tensor.as_numpy()
        if audio.ndim != 2:
            raise ValueError(f"'{self._input_name}' must be [batch, samples], got shape {list(audio.shape)}")
        if audio.shape[0] < 1:
            raise ValueError(f"'{self._input_name}' has an empty batch")
        if audio.shape[1] < self._min_samples:
            raise ValueError(
                f"'{self._input_name}' has {audio.shape[1]} samples; at least {self._min_samples} "
                f"(one wav2vec2 frame) are required"
            )
        if not np.isfinite(audio).all():
            raise ValueError(f"'{self._input_name}' contains NaN or infinite samples")
        return audio.astype(np.float32, copy=False)

    @staticmethod
    def _error(message: str) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            try:
                audio = self._validated_audio(request)
            except ValueError as exc:
                responses[index] = self._error(str(exc))
                continue
            groups.setdefault(audio.shape[1], []).append((index, audio))

        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _run_group(self, members: list[tuple[int, np.ndarray]], responses: list[Any]) -> None:
        """One ORT run for requests of equal length; fills their slots in ``responses``."""
        batch = members[0][1] if len(members) == 1 else np.concatenate([audio for _, audio in members], axis=0)
        try:
            outputs = self._session.run(self._output_names, {self._input_name: batch})
        except Exception as exc:  # an ORT failure fails this group only, never the whole execute()
            self._logger.log_error(f"wav2vec2 onnxruntime run failed for batch {list(batch.shape)}: {exc}")
            for index, _ in members:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"wav2vec2 inference failed: {exc}")
                )
            return
        offset = 0
        for index, audio in members:
            rows = slice(offset, offset + audio.shape[0])
            offset += audio.shape[0]
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[rows], dtype=dtype))
                for name, output, dtype in zip(self._output_names, outputs, self._output_dtypes)
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self._session = None
