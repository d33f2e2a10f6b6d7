"""Coordinator LLM — decoupled Triton python-backend model streaming one response per generated token.

Why an explicit sampling loop (instead of ``model.generate`` + ``TextIteratorStreamer``): the loop owns every step,
so it can check ``response_sender.is_cancelled()`` before each forward pass (a cancelled gRPC stream stops GPU/CPU
work within one token), sample with a per-request seeded ``torch.Generator`` (same seed -> same tokens regardless
of concurrent traffic), apply stop strings on decoded text, and emit only complete UTF-8 characters.

Threading: ``execute()`` hands each request to a bounded worker pool and returns ``None`` immediately (decoupled
contract), so several generations progress at the same time and Triton's scheduler is never blocked. Torch releases
the GIL inside kernels, so threads overlap real compute. ``finalize()`` stops the loops and joins the workers.

Protocol (tensor names are validated against the model config at load; a config lacking one fails to load):
  inputs  prompt (BYTES [1], the user request — no system prompt, the chat template is applied here),
          max_tokens INT32, temperature FP32 (0 -> greedy argmax), top_p FP32, seed INT64, stop BYTES [-1],
          json_schema BYTES [1] (optional: the answer must be JSON matching this schema, see "Constrained answers")
  outputs text (BYTES, decoded delta), token_id (INT32, -1 on a terminal response without a token),
          finish_reason (BYTES, only on the last response: "stop" | "length" | "cancelled")
A model without a reasoning channel (no ``<think>`` token, e.g. SmolLM2) starts every stream with one response whose
text is ``</think>`` and token_id -1: its thinking is empty, and readers split every stream the same way.
Every request ends with exactly one response flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL, also after errors.
Each finished request logs ``coordinator request <id> finished reason=<r> tokens=<n>``. (No pb_utils custom metrics:
``Metric.increment`` blocks forever when called from a worker thread in this python backend version.)
"""

from __future__ import annotations

import codecs
import json
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

from constrained import AnswerConstraint, Grammars, closing_scores, shortest_answer

# Tensor names expected in config.pbtxt (checked against the parsed config in initialize()).
INPUT_ROLES = ("prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "json_schema")
OUTPUT_ROLES = ("text", "token_id", "finish_reason")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Error responses of a decoupled model carry no status code in Triton 2.41: the orchestrator's Triton client reads these
# markers at the start of the message (grym_synth/inference/triton_client.py: INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
INVALID_REQUEST_MARKER = "invalid request:"
OVERLOADED_MARKER = "overloaded:"
# DeepSeek: "enforce the model to initiate its response with <think>\n" — appended when a template does not.
THINK_PREFILL = THINK_OPEN + "\n"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/Qwen byte-level alphabet: byte value -> printable unicode char used inside BPE token strings."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class TokenBytes:
    """Per-checkpoint table token id -> exact bytes, shared by all requests (built lazily, GIL-safe dict writes).

    Why: byte-level BPE tokens are arbitrary byte strings (an emoji is often split over two tokens), so decoding
    token by token would emit U+FFFD garbage. Mapping each token to its bytes lets an incremental UTF-8 decoder hold
    incomplete sequences until the next token completes them. Special tokens (BOS/EOS/pad) map to no bytes, like
    ``decode(skip_special_tokens=True)``; ids beyond the tokenizer (padded embedding rows) too."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = self._is_byte_level(tokenizer)
        self._special_ids = set(tokenizer.all_special_ids)
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if i not in self._special_ids}
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    @staticmethod
    def _is_byte_level(tokenizer) -> bool:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
        return "ByteLevel" in kinds

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._special_ids:
            data = b""
        elif token_id in self._added:
            data = self._added[token_id].encode("utf-8")
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is None:
                data = b""
            else:
                try:
                    data = bytes(self._byte_decoder[ch] for ch in piece)
                except KeyError:
                    data = piece.encode("utf-8")
        self._cache[token_id] = data
        return data


class IncrementalDetokenizer:
    """Turns one request's token-id stream into text deltas that only ever contain complete UTF-8 characters.

    Byte-level tokenizers: exact token bytes into an incremental UTF-8 decoder (see :class:`TokenBytes`). Other
    tokenizers (e.g. SentencePiece) fall back to re-decoding a sliding window and emitting only the stable suffix."""

    def __init__(self, table: TokenBytes) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        if self._table.byte_level:
            return self._utf8.decode(self._table(token_id))
        self._ids.append(token_id)
        return self._window_delta(final=False)

    def flush(self) -> str:
        if self._table.byte_level:
            return self._utf8.decode(b"", final=True)
        return self._window_delta(final=True)

    def _window_delta(self, final: bool) -> str:
        def decode(ids: list[int]) -> str:
            return self._table.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""


class StopStringFilter:
    """Applies stop strings to streamed text without ever emitting (part of) a stop string.

    Text that could still become a stop string (a suffix equal to a stop string's prefix) is held back until the
    next delta disambiguates it, so a stop string split across tokens is still caught and never leaks."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self._stops:
            return delta, False
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _to_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _scalar(inputs: dict, role: str, default, cast):
    values = inputs[role]
    if values is None or values.size == 0:
        return default
    if values.size != 1:
        raise ValueError(f"{role} must be a single value")
    return cast(values[0])


class TritonPythonModel:
    """Decoupled streaming generator; see the module docstring."""

    def initialize(self, args: dict) -> None:
        self.logger = pb_utils.Logger
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                "coordinator streams one response per token: set model_transaction_policy { decoupled: true }"
            )
        self._inputs = self._tensor_names("input", INPUT_ROLES)
        self._outputs = self._tensor_names("output", OUTPUT_ROLES)
        self._params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        checkpoint = self._resolve_checkpoint(version_dir)

        threads = int(self._params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = self._pick_device(args)
        dtype = self._pick_dtype()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self._eos_ids = self._eos_token_ids()
        # looked up once: get_vocab() builds a dict of the whole vocabulary (150k entries for real checkpoints)
        self._has_think_token = THINK_OPEN in self.tokenizer.get_vocab()
        self._token_bytes = TokenBytes(self.tokenizer)
        # Ids >= tokenizer size are padded embedding rows (e.g. 152064 vs 151665 for DeepSeek-R1-Distill-Qwen); they
        # decode to nothing, so they are never sampled.
        self._vocab_limit = len(self.tokenizer)
        self._max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        # Constrained answers (json_schema): reasoning models think first, the others answer from the first token.
        self._think_close_ids = (self.tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
                                 if self._has_think_token else None)
        self._grammars = Grammars(self.tokenizer, self._vocab_limit)
        self._closing_scores = None
        self._closing_lock = threading.Lock()
        self._shortest: dict[str, int] = {}  # schema text -> tokens of its shortest answer (closing margin)

        self._default_max_tokens = int(self._params.get("default_max_tokens") or 512)
        self._default_temperature = float(self._params.get("default_temperature") or 0.6)
        self._default_top_p = float(self._params.get("default_top_p") or 0.95)
        self._max_pending = int(self._params.get("max_pending") or 64)
        self._answer_reserve = int(self._params.get("answer_reserve_tokens") or 256)
        self._close_margin = int(self._params.get("json_close_margin") or 48)
        self._pool = ThreadPoolExecutor(
            max_workers=int(self._params.get("max_concurrency") or 4), thread_name_prefix="coordinator-gen"
        )
        self._pending = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.logger.log_info(
            f"coordinator loaded {checkpoint} on {self.device} ({dtype}), vocab={self._vocab_limit}, "
            f"eos={sorted(self._eos_ids)}"
        )

    # ---------------------------------------------------------------- setup helpers
    def _tensor_names(self, kind: str, roles: tuple[str, ...]) -> dict[str, str]:
        declared = {t["name"] for t in self.model_config.get(kind, [])}
        missing = [r for r in roles if r not in declared]
        if missing:
            raise pb_utils.TritonModelException(f"coordinator config lacks {kind}s {missing}")
        return {r: r for r in roles}

    def _resolve_checkpoint(self, version_dir: str) -> str:
        configured = (self._params.get("checkpoint_dir") or "").strip()
        pointer = os.path.join(version_dir, "checkpoint.json")
        if configured:
            checkpoint = configured
        elif os.path.isfile(pointer):
            with open(pointer) as fh:
                checkpoint = json.load(fh)["checkpoint_dir"]
        else:
            checkpoint = os.path.join(version_dir, "checkpoint")
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise pb_utils.TritonModelException(
                f"coordinator checkpoint {checkpoint!r} has no config.json (run the exporter or set checkpoint_dir)"
            )
        return checkpoint

    def _pick_device(self, args: dict) -> torch.device:
        wanted = (self._params.get("device") or "auto").lower()
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda":
            device_id = int(args.get("model_instance_device_id") or 0)
            if args.get("model_instance_kind") != "GPU":
                device_id = 0
            return torch.device("cuda", device_id)
        return torch.device(wanted)

    def _pick_dtype(self) -> torch.dtype:
        wanted = (self._params.get("dtype") or "auto").lower()
        if wanted == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[wanted]

    def _eos_token_ids(self) -> set[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        return ids

    # ---------------------------------------------------------------- request handling
    def execute(self, requests):
        """Copy each request's inputs (request tensors must not outlive execute()) and hand it to a worker."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = self._read_inputs(request)
                request_id = request.request_id() or "-"
            except Exception as exc:
                message = f"{INVALID_REQUEST_MARKER} coordinator could not read the request: {exc}"
                self._send_error(sender, message, pb_utils.TritonError.INVALID_ARG)
                continue
            with self._lock:
                accept = self._pending < self._max_pending and not self._stopping.is_set()
                if accept:
                    self._pending += 1
            if not accept:
                self._send_error(sender, f"{OVERLOADED_MARKER} coordinator is at capacity, retry later",
                                 pb_utils.TritonError.UNAVAILABLE)
                continue
            try:
                self._pool.submit(self._run, inputs, request_id, sender)
            except RuntimeError as exc:  # pool already shut down (model unloading)
                self._done()
                self._send_error(sender, f"coordinator model is not ready (unloading): {exc}",
                                 pb_utils.TritonError.UNAVAILABLE)
        return None

    def _read_inputs(self, request) -> dict[str, np.ndarray | None]:
        values = {}
        for role in INPUT_ROLES:
            tensor = pb_utils.get_input_tensor_by_name(request, self._inputs[role])
            values[role] = None if tensor is None else np.array(tensor.as_numpy(), copy=True).reshape(-1)
        return values

    def _run(self, inputs: dict, request_id: str, sender) -> None:
        started = time.monotonic()
        try:
            try:
                options = self._parse(inputs)
            except ValueError as exc:
                self._send_error(sender, f"{INVALID_REQUEST_MARKER} {exc}", pb_utils.TritonError.INVALID_ARG)
                return
            reason, produced = self._generate(sender, options)
            self.logger.log_info(
                f"coordinator request {request_id} finished reason={reason} tokens={produced} "
                f"seconds={time.monotonic() - started:.3f}"
            )
        except Exception as exc:  # never leave a stream open: final error response
            self.logger.log_error(f"coordinator request {request_id} failed: {traceback.format_exc()}")
            self._send_error(sender, f"coordinator generation failed: {exc}", pb_utils.TritonError.INTERNAL)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _parse(self, inputs: dict) -> dict:
        prompt = inputs["prompt"]
        if prompt is None or prompt.size != 1:
            raise ValueError("prompt must hold exactly one string")
        text = _to_str(prompt[0])
        max_tokens = _scalar(inputs, "max_tokens", self._default_max_tokens, int)
        temperature = _scalar(inputs, "temperature", self._default_temperature, float)
        top_p = _scalar(inputs, "top_p", self._default_top_p, float)
        seed = _scalar(inputs, "seed", None, int)
        stops = [] if inputs["stop"] is None else [_to_str(s) for s in inputs["stop"]]
        schema = inputs["json_schema"]
        schema_text = _to_str(schema[0]).strip() if schema is not None and schema.size == 1 else ""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not (temperature >= 0.0 and np.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        prompt_ids = self._encode(text)
        if self._max_positions:
            room = self._max_positions - len(prompt_ids)
            if room < 1:
                raise ValueError(f"prompt is {len(prompt_ids)} tokens, the model context is {self._max_positions}")
            max_tokens = min(max_tokens, room)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        constraint = self._constraint(schema_text, max_tokens) if schema_text else None
        return {
            "prompt_ids": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stops": stops,
            "constraint": constraint,
        }

    def _constraint(self, schema_text: str, max_tokens: int) -> AnswerConstraint:
        """The request's answer constraint (ValueError for a schema that cannot be compiled: the request's fault)."""
        if self._closing_scores is None:
            with self._closing_lock:
                if self._closing_scores is None:
                    self._closing_scores = closing_scores(self._token_bytes, self._vocab_limit)
        shortest = self._shortest.get(schema_text)
        if shortest is None:
            shortest = shortest_answer(self._grammars.matcher(schema_text), self._closing_scores, self._token_bytes)
            self._shortest[schema_text] = shortest
        # A budget that cannot hold even the shortest answer keeps no reserve: the model reasons until max_tokens and
        # the caller falls back ("no JSON in the answer") rather than receiving a JSON fragment.
        reserve = max(self._answer_reserve, 2 * shortest) if max_tokens > shortest else 0
        return AnswerConstraint(self._grammars.matcher(schema_text), think_close_ids=self._think_close_ids,
                                max_tokens=max_tokens, answer_reserve=reserve,
                                close_margin=max(self._close_margin, shortest + 16),
                                closing_scores=self._closing_scores, token_bytes=self._token_bytes)

    def _encode(self, user_prompt: str) -> list[int]:
        """Chat template with the user turn only (DeepSeek: no system prompt), opened inside a think block."""
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_prompt}], tokenize=False, add_generation_prompt=True
        )
        if self._has_think_token and not rendered.endswith(THINK_PREFILL):
            rendered += THINK_PREFILL
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------- generation
    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
        logits = logits.float()
        if logits.shape[-1] > self._vocab_limit:
            logits[self._vocab_limit :] = float("-inf")
        if temperature <= 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            pick = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
            return int(order.cpu()[pick])
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def _next_token(self, logits: torch.Tensor, options: dict, generator: torch.Generator,
                    produced: int) -> tuple[int, bool]:
        """(token, forced): sampled freely, or within the answer constraint (see constrained.py)."""
        constraint = options["constraint"]
        if constraint is None:
            return self._sample(logits, options["temperature"], options["top_p"], generator), False
        forced = constraint.forced(produced)
        if forced is not None:
            return forced, True
        logits = logits.float().clone()
        mask = constraint.allowed(logits.shape[-1])
        if mask is None:  # free thinking, but the answer must still come: no end of text before </think>
            for eos in self._eos_ids:
                if eos < logits.shape[-1]:
                    logits[eos] = float("-inf")
        else:
            if not mask.any():
                raise RuntimeError(f"the answer grammar allows no token: {constraint.error or 'dead end'}")
            choice = constraint.closing_choice(mask, produced)
            if choice is not None:
                return choice, False
            logits[torch.from_numpy(~mask).to(logits.device)] = float("-inf")
        return self._sample(logits, options["temperature"], options["top_p"], generator), False

    def _generate(self, sender, options: dict) -> tuple[str, int]:
        """KV-cached decode loop. Returns (finish_reason, tokens generated)."""
        generator = torch.Generator(device="cpu").manual_seed(options["seed"])
        detok = IncrementalDetokenizer(self._token_bytes)
        stops = StopStringFilter(options["stops"])
        constraint = options["constraint"]
        max_tokens = options["max_tokens"]
        produced = 0
        with torch.inference_mode():
            if self._cancelled(sender):
                return self._finish(sender, "", -1, "cancelled"), produced
            if not self._has_think_token:
                sender.send(self._response(THINK_CLOSE, -1))  # no reasoning channel: the thinking is empty
            ids = torch.tensor([options["prompt_ids"]], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            while True:
                token, forced = self._next_token(out.logits[0, -1], options, generator, produced)
                produced += 1
                if constraint is not None and not constraint.advance(token, forced):
                    raise RuntimeError(f"the answer grammar refused token {token}: {constraint.error}")
                if token in self._eos_ids:
                    return self._finish(sender, stops.push(detok.flush())[0] + stops.flush(), token, "stop"), produced
                text, stopped = stops.push(detok.push(token))
                if stopped:
                    return self._finish(sender, text, token, "stop"), produced
                if constraint is not None and constraint.complete:
                    return self._finish(sender, text + detok.flush() + stops.flush(), token, "stop"), produced
                if produced >= max_tokens:
                    tail, stopped = stops.push(detok.flush())
                    text += tail if stopped else tail + stops.flush()
                    return self._finish(sender, text, token, "stop" if stopped else "length"), produced
                if self._cancelled(sender):
                    # the client is gone; the final response only closes the request inside Triton
                    return self._finish(sender, "", -1, "cancelled"), produced
                sender.send(self._response(text, token))
                next_ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
                out = self.model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)

    def _cancelled(self, sender) -> bool:
        return self._stopping.is_set() or sender.is_cancelled()

    def _response(self, text: str, token_id: int, finish_reason: str | None = None):
        tensors = [
            pb_utils.Tensor(self._outputs["text"], np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor(self._outputs["token_id"], np.array([token_id], dtype=np.int32)),
        ]
        if finish_reason is not None:
            tensors.append(
                pb_utils.Tensor(self._outputs["finish_reason"], np.array([finish_reason.encode()], dtype=np.object_))
            )
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _finish(self, sender, text: str, token_id: int, reason: str) -> str:
        sender.send(self._response(text, token_id, reason), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return reason

    def _send_error(self, sender, message: str, code) -> None:
        """Final error response; if even that fails, close the stream with a bare FINAL flag."""
        try:
            error = pb_utils.TritonError(message, code)
            sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:
            try:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:
                self.logger.log_error(f"coordinator could not close a response stream: {traceback.format_exc()}")

    def finalize(self) -> None:
        """Unload: running loops end at their next token with finish_reason "cancelled", then workers are joined."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.logger.log_info("coordinator finalized")
