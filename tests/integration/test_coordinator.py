"""Coordinator LLM: tokenizer/template, exporter, the decoupled Triton model (real tritonserver), and the
orchestrator-side stream clients.

The Triton tests run the tiny seeded Qwen2 checkpoint in a real tritonserver (one per module, only the coordinator
model). The OpenAI backend is tested against a small in-test aiohttp server speaking the OpenAI SSE protocol — the
one test double in this file, because no OpenAI-compatible LLM server runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import random
import re
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from grym_synth.coordinator.base import (
    CoordinatorRequestError,
    CoordinatorStreamError,
    CoordinatorTimeout,
    CoordinatorUnavailable,
    TokenEvent,
)
from grym_synth.coordinator.latency import measure_stream_latency
from grym_synth.coordinator.openai_backend import OpenAICoordinatorBackend
from grym_synth.coordinator.thinking import ThinkSplitter
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend
from grym_synth.core.errors import DeadlineExceeded, Unavailable
from grym_synth.core.metrics import Metrics
from grym_synth.inference.export import coordinator as coord_export
from grym_synth.inference.triton_client import TritonClient
from grym_synth.inference.triton_process import EmbeddedTriton, TritonStartError, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "model_repository" / "coordinator"
SEED = 0


# ------------------------------------------------------------------------------------------------ fixtures
def _build_repo(out_dir: Path) -> Path:
    """Materialise a repository holding only the coordinator (through the registry once it is registered)."""
    from grym_synth.inference.export import repository

    if "coordinator" in repository.EXPORTERS:
        repository.build_repository("tiny", out_dir, seed=SEED, models=["coordinator"], force=True)
    else:
        dst = out_dir / "coordinator"
        shutil.copytree(TEMPLATE, dst, ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
        coord_export.export("tiny", dst, None, SEED)
    return out_dir


@pytest.fixture(scope="module")
def coord_repo(tmp_path_factory) -> Path:
    return _build_repo(tmp_path_factory.mktemp("coordinator_repo"))


@pytest.fixture(scope="module")
def checkpoint(coord_repo) -> Path:
    return coord_repo / "coordinator" / "1" / "checkpoint"


@pytest.fixture(scope="module")
def coord_triton(coord_repo, tmp_path_factory):
    """A private tritonserver with only the coordinator (tests here cancel, overload and read its log), restricted:
    every call must carry its secret header, which only the TritonClient built from it sends."""
    server = EmbeddedTriton(coord_repo, tmp_path_factory.mktemp("coordinator_triton") / "triton.log", restrict=True)
    server.start()
    server.wait_models_ready(["coordinator"], timeout_s=60)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf(checkpoint):
    """The same checkpoint loaded with plain transformers, as the reference implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    return tokenizer, model


def _triton_client(triton: EmbeddedTriton | str, metrics: Metrics | None = None) -> TritonClient:
    """The one path to Triton (with the server's secret header when it has one)."""
    if isinstance(triton, str):
        return TritonClient(triton, metrics=metrics)
    return TritonClient(triton.grpc_url, headers=triton.auth_headers or None, metrics=metrics)


@pytest.fixture
async def triton_client(coord_triton):
    client = _triton_client(coord_triton, Metrics())
    yield client
    await client.close()


@pytest.fixture
async def backend(triton_client):
    client = TritonCoordinatorBackend(triton_client, token_timeout_s=20.0)
    yield client
    await client.close()


def _load_model_module():
    """Import the served model.py (for its pure helpers) with the real triton_python_backend_utils on the path."""
    from grym_synth.inference.triton_process import pytriton_root

    utils_dir = str(pytriton_root() / "backends" / "python")
    if utils_dir not in sys.path:
        sys.path.append(utils_dir)
    if str(TEMPLATE / "1") not in sys.path:  # the folder the backend puts on sys.path (model.py imports beside it)
        sys.path.append(str(TEMPLATE / "1"))
    spec = importlib.util.spec_from_file_location("coordinator_model", TEMPLATE / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _collect(agen) -> list:
    async with contextlib.aclosing(agen) as items:
        return [item async for item in items]


async def _wait_for_log(server: EmbeddedTriton, pattern: str, timeout_s: float = 20.0) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(pattern, server.log())
        if match:
            return match
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the Triton log:\n{server.log()[-3000:]}")


# ------------------------------------------------------------------------------------------------ tokenizer
UNICODE_SAMPLES = [
    "Plain ASCII with punctuation: tempo=120, key='A minor'!",
    "Größe, Übung, déjà vu, niño, ¿qué?",
    "音乐从安静开始 — こんにちは、世界 — 안녕하세요",
    "Emoji 🎵🎶🥁 and a family 👨‍👩‍👧 and a flag 🇳🇴",
    "Rare: 𝄞 (musical G clef), ꙮ, 🜁, \u2028line sep",
    "Math ∑∫√∞ ≈ ≠ and tabs\tand\nnewlines\r\n",
    "<think>tags stay tags</think> and <｜User｜> markers",
]


def test_tokenizer_round_trips_unicode():
    tokenizer = coord_export.build_tokenizer()
    for text in UNICODE_SAMPLES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    # tags and role markers are single tokens (never split by BPE); BOS/EOS are special and skipped in decoding
    markers = (coord_export.THINK_OPEN, coord_export.THINK_CLOSE, coord_export.USER_TOKEN, coord_export.ASSISTANT_TOKEN)
    for token in markers:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    eos = tokenizer.eos_token_id
    assert tokenizer.decode([eos], skip_special_tokens=True) == ""
    # byte-level: an emoji unseen in training still encodes (via byte tokens) and round-trips
    assert tokenizer.decode(tokenizer("🦩", add_special_tokens=False)["input_ids"]) == "🦩"


def test_chat_template_ends_with_think_prefill_and_has_no_system_prompt():
    tokenizer = coord_export.build_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a calm piano piece"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<｜Assistant｜><think>\n")
    assert rendered == "<｜begin▁of▁sentence｜><｜User｜>Write a calm piano piece<｜Assistant｜><think>\n"
    assert rendered == coord_export.render_chat_prompt("Write a calm piano piece")
    # a previous assistant turn keeps only its answer (DeepSeek drops the reasoning from history)
    history = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nB"},
            {"role": "user", "content": "c"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "hmm" not in history and "<｜Assistant｜>\n\nB<｜end▁of▁sentence｜><｜User｜>c" in history


# ------------------------------------------------------------------------------------------------ exporter
def test_export_is_seeded_and_reproducible(tmp_path, checkpoint):
    meta = coord_export.export("tiny", tmp_path / "a" / "coordinator", None, SEED)
    assert meta["architecture"] == "Qwen2ForCausalLM"
    assert meta["vocab_size"] == meta["tokenizer_size"] > 256
    assert 100_000 < meta["parameters"] < 1_000_000
    fresh = tmp_path / "a" / "coordinator" / "1" / "checkpoint"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (fresh / name).read_bytes() == (checkpoint / name).read_bytes(), name
    config = json.loads((fresh / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (64, 2, 4, 2)
    coord_export.export("tiny", tmp_path / "b" / "coordinator", None, SEED + 1)
    other = tmp_path / "b" / "coordinator" / "1" / "checkpoint"
    assert (other / "model.safetensors").read_bytes() != (fresh / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (fresh / "tokenizer.json").read_bytes()


def test_export_with_local_weights_only_records_the_path(tmp_path, checkpoint, hf):
    model_dir = tmp_path / "coordinator"
    shutil.copytree(TEMPLATE, model_dir, ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
    meta = coord_export.export("full", model_dir, checkpoint, SEED)
    pointer = json.loads((model_dir / "1" / "checkpoint.json").read_text())
    assert pointer == {"checkpoint_dir": str(checkpoint.resolve())}
    assert not (model_dir / "1" / "checkpoint").exists()
    assert meta["architecture"] == "Qwen2ForCausalLM" and meta["checkpoint"] == str(checkpoint.resolve())
    assert meta["parameters"] == sum(p.numel() for p in hf[1].parameters())  # from safetensors headers only
    engine_args = json.loads((model_dir / "1" / "model.json").read_text())
    assert engine_args["model"] == str(checkpoint.resolve()) and engine_args["max_model_len"] <= 2048
    with pytest.raises(FileNotFoundError):
        coord_export.export("full", tmp_path / "x", tmp_path / "missing", SEED)
    with pytest.raises(ValueError):
        coord_export.export("full", tmp_path / "y", None, SEED)


def test_vllm_variant_config_is_consistent():
    text = (TEMPLATE / "configs" / "vllm.pbtxt").read_text()
    assert 'backend: "vllm"' in text and "decoupled: true" in text
    for name in ("text_input", "stream", "sampling_parameters", "text_output"):
        assert f'name: "{name}"' in text
    engine_args = json.loads((TEMPLATE / "vllm_model.json").read_text())
    assert {"model", "gpu_memory_utilization", "tensor_parallel_size"} <= set(engine_args)


# ------------------------------------------------------------------------------------------------ model.py helpers
def test_detokenizer_emits_only_complete_utf8_characters(checkpoint):
    from transformers import AutoTokenizer

    module = _load_model_module()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    table = module.TokenBytes(tokenizer)
    assert table.byte_level
    for text in UNICODE_SAMPLES:
        text = unicodedata.normalize("NFC", text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        detok = module.IncrementalDetokenizer(table)
        deltas = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas), deltas
    # the emoji is split over several byte-level tokens: the partial ones emit nothing
    ids = tokenizer("🎵", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = module.IncrementalDetokenizer(table)
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🎵"]
    # special tokens produce no text; invalid byte sequences become U+FFFD exactly like tokenizer.decode
    detok = module.IncrementalDetokenizer(table)
    assert detok.push(tokenizer.eos_token_id) == ""
    rng = random.Random(1)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    detok = module.IncrementalDetokenizer(table)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)
    # the sliding-window fallback (non byte-level tokenizers) gives the same complete-character deltas
    window = module.TokenBytes(tokenizer)
    window.byte_level = False
    for text in UNICODE_SAMPLES:
        text = unicodedata.normalize("NFC", text)
        detok = module.IncrementalDetokenizer(window)
        deltas = [detok.push(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]] + [detok.flush()]
        assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_stop_string_filter_holds_back_partial_matches():
    module = _load_model_module()
    stops = module.StopStringFilter(["END", "\n\n"])
    assert stops.push("abc E") == ("abc ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("x") == ("ENx", False)
    assert stops.push("yyE") == ("yy", False)
    assert stops.push("ND tail") == ("", True)
    stops = module.StopStringFilter(["\n\n"])
    assert stops.push("line\n") == ("line", False)
    assert stops.push("\nmore") == ("", True)
    stops = module.StopStringFilter(["zz"])
    assert stops.push("az") == ("a", False) and stops.flush() == "z"


# ------------------------------------------------------------------------------------------------ Triton streaming
def _reference_ids(hf, prompt: str, max_new_tokens: int) -> list[int]:
    import torch

    tokenizer, model = hf
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )
    return out[0, ids["input_ids"].shape[1]:].tolist()


async def test_greedy_stream_matches_transformers_generate(backend, hf):
    prompt = "Plan a 90 BPM lo-fi beat 🎧 with warm keys"
    tokens = await _collect(backend.stream_tokens(prompt, max_tokens=40, temperature=0.0))
    triton_ids = [t.token_id for t in tokens]
    assert triton_ids == _reference_ids(hf, prompt, 40)
    assert tokens[-1].finish_reason in ("length", "stop")
    assert all(t.finish_reason is None for t in tokens[:-1])


async def test_stream_is_ordered_utf8_safe_and_honours_max_tokens(backend, hf):
    tokenizer, _ = hf
    tokens = await _collect(backend.stream_tokens("Hallo 🎵 你好", max_tokens=17, temperature=1.0, seed=7))
    assert len(tokens) == 17 and tokens[-1].finish_reason == "length"
    assert [t.received_s for t in tokens] == sorted(t.received_s for t in tokens)
    ids = [t.token_id for t in tokens]
    assert "".join(t.text for t in tokens) == tokenizer.decode(ids, skip_special_tokens=True)
    # each delta only completes characters: the text so far is always a prefix of the full decode
    text = ""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for t in tokens:
        text += t.text
        assert full.startswith(text)


async def test_stream_events_are_thinking_until_think_close(backend):
    events = await _collect(backend.stream("Compose", max_tokens=12, temperature=0.0))
    assert events[-1].finish_reason == "length" and events[-1].text == ""
    assert all(isinstance(e, TokenEvent) for e in events)
    # the prompt opened <think>; the random tiny model never closes it, so everything is reasoning
    assert {e.kind for e in events} == {"thinking"}
    indexes = [e.token_index for e in events]
    assert indexes == sorted(indexes) and indexes[-1] == 11


async def test_same_seed_same_tokens_different_seed_different_tokens(backend):
    async def ids(seed):
        return [t.token_id for t in await _collect(
            backend.stream_tokens("Seeded sampling", max_tokens=24, temperature=1.0, top_p=0.9, seed=seed))]

    first = await ids(1234)
    assert await ids(1234) == first
    assert await ids(1235) != first


async def test_stop_strings_end_the_stream_without_emitting_the_stop(backend):
    prompt = "Stop strings"
    baseline = "".join(t.text for t in await _collect(backend.stream_tokens(prompt, max_tokens=40, temperature=0.0)))
    clean = [i for i in range(3, len(baseline) - 2) if "\ufffd" not in baseline[i:i + 2]]
    assert clean, baseline
    stop = baseline[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]
    expected = baseline[: baseline.index(stop)]
    tokens = await _collect(backend.stream_tokens(prompt, max_tokens=40, temperature=0.0, stop=[stop, "never-seen"]))
    assert tokens[-1].finish_reason == "stop"
    assert "".join(t.text for t in tokens) == expected
    assert len(tokens) < 40


async def test_cancellation_stops_generation_and_server_stays_healthy(backend, coord_triton):
    request_id = "cancel-me-1"
    received = 0
    async with contextlib.aclosing(
        # greedy: the tiny model loops without emitting EOS, so only cancellation can end this early
        backend.stream_tokens("Long generation", max_tokens=2000, temperature=0.0, request_id=request_id)
    ) as tokens:
        async for _ in tokens:
            received += 1
            if received == 3:
                break
    match = await _wait_for_log(coord_triton, rf"coordinator request {request_id} finished reason=(\w+) tokens=(\d+)")
    assert match.group(1) == "cancelled"
    assert int(match.group(2)) < 200, match.group(0)  # not the 2000 it was asked for
    # the model keeps serving
    again = await _collect(backend.stream_tokens("Still alive?", max_tokens=5, temperature=0.0))
    assert len(again) == 5 and again[-1].finish_reason == "length"


async def test_deadline_cancels_the_stream(backend, coord_triton):
    with pytest.raises(CoordinatorTimeout) as info:
        await _collect(backend.stream_tokens("Deadline", max_tokens=2000, temperature=0.0, deadline_s=0.3,
                                             request_id="deadline-1"))
    assert isinstance(info.value, DeadlineExceeded) and "deadline" in str(info.value)
    match = await _wait_for_log(coord_triton, r"coordinator request deadline-1 finished reason=(\w+) tokens=(\d+)")
    assert match.group(1) == "cancelled" and int(match.group(2)) < 2000


async def test_concurrent_streams_overlap_and_keep_their_seeds(backend):
    seeds = [11, 12, 13, 14]
    alone = {s: [t.token_id for t in await _collect(
        backend.stream_tokens("Concurrent", max_tokens=48, temperature=1.0, seed=s))] for s in seeds}
    results = await asyncio.gather(*(
        _collect(backend.stream_tokens("Concurrent", max_tokens=48, temperature=1.0, seed=s)) for s in seeds))
    for seed, tokens in zip(seeds, results):
        assert [t.token_id for t in tokens] == alone[seed]
        assert tokens[-1].finish_reason == "length"
    # the streams were served at the same time, not one after another
    first_tokens = [tokens[0].received_s for tokens in results]
    last_tokens = [tokens[-1].received_s for tokens in results]
    assert max(first_tokens) < min(last_tokens)


async def test_invalid_request_gets_an_error_and_final_flag(coord_triton):
    import tritonclient.grpc.aio as triton_aio

    from grym_synth.inference.triton_client import _RawStream, _stream_request

    # The raw stream, as TritonClient opens it (empty final response requested), without its error mapping.
    request = _stream_request("coordinator", {"prompt": np.array([b"x"], dtype=np.object_),
                                              "max_tokens": np.array([0], dtype=np.int32)}, [], "", None)
    client = triton_aio.InferenceServerClient(coord_triton.grpc_url)
    responses = []
    try:
        stream = _RawStream.open(client, request, 30, coord_triton.auth_headers)
        while True:
            try:
                responses.append(await stream.__anext__())
            except StopAsyncIteration:
                break
    finally:
        await client.close()
    assert len(responses) == 1
    result, error = responses[0]
    assert result is None and error.message() == "invalid request: max_tokens must be >= 1, got 0"
    # the client validates the same before sending
    triton = _triton_client(coord_triton)
    try:
        with pytest.raises(CoordinatorRequestError):
            await _collect(TritonCoordinatorBackend(triton).stream_tokens("x", top_p=1.5))
    finally:
        await triton.close()


async def test_unreachable_triton_and_unknown_model_are_unavailable(coord_triton, triton_client):
    url = f"127.0.0.1:{free_port()}"
    triton = _triton_client(url)
    try:
        with pytest.raises(CoordinatorUnavailable) as info:
            await _collect(TritonCoordinatorBackend(triton).stream("hello", max_tokens=3))
    finally:
        await triton.close()
    assert isinstance(info.value, Unavailable) and url in str(info.value)
    missing = TritonCoordinatorBackend(triton_client, model_name="no_such_coordinator")
    with pytest.raises(CoordinatorUnavailable) as info:
        await _collect(missing.stream("hello", max_tokens=3))
    assert "no_such_coordinator" in str(info.value)


async def test_the_coordinator_goes_through_the_triton_client(coord_triton, triton_client, backend):
    """One path to Triton: the secret header of the restricted server, the model's breaker and the error metrics
    are the TritonClient's; without the secret the stream is refused, and only a downstream fault counts."""
    metrics = triton_client.metrics
    assert metrics is not None

    def errors(kind: str) -> float:
        return metrics.registry.get_sample_value("grym_triton_errors_total",
                                                 {"model": "coordinator", "code": kind}) or 0.0

    breaker = triton_client.breaker("coordinator")
    events = await _collect(backend.stream("Through the client", max_tokens=4, temperature=0.0))
    assert events[-1].finish_reason == "length" and breaker.breaker.fail_counter == 0 and breaker.state == "closed"
    # a stalled token (the per-token timeout is the stream's idle timeout) is a deadline, not a breaker failure
    stalled = TritonCoordinatorBackend(triton_client, token_timeout_s=0.001)
    with pytest.raises(CoordinatorTimeout, match="produced no token"):
        await _collect(stalled.stream("Stall", max_tokens=50, temperature=0.0))
    assert errors("DEADLINE_EXCEEDED") == 1 and breaker.breaker.fail_counter == 0
    # the same server without the secret (a client built from the URL alone) is refused: a downstream fault
    # (Triton 2.41 closes the stream, which the client reports as UNAVAILABLE or INTERNAL depending on timing)
    blind = _triton_client(coord_triton.grpc_url, metrics)
    try:
        with pytest.raises((CoordinatorUnavailable, CoordinatorStreamError)) as info:
            await _collect(TritonCoordinatorBackend(blind).stream("No secret", max_tokens=3))
        assert "restricted" not in str(info.value) and "cygrpc" not in str(info.value)  # raw text: log only
        assert blind.breaker("coordinator").breaker.fail_counter == 1
    finally:
        await blind.close()
    assert errors("UNAVAILABLE") + errors("INTERNAL") == 1


async def test_model_serves_a_checkpoint_recorded_by_export_weights(tmp_path, checkpoint, backend):
    """--weights DIR: the exporter only records the path (1/checkpoint.json) and model.py loads from there."""
    repo = tmp_path / "repo"
    model_dir = repo / "coordinator"
    shutil.copytree(TEMPLATE, model_dir, ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
    coord_export.export("full", model_dir, checkpoint, SEED)
    server = EmbeddedTriton(repo, tmp_path / "triton.log", startup_timeout_s=120)
    server.start()
    try:
        triton = _triton_client(server)
        other = TritonCoordinatorBackend(triton)
        ids = [t.token_id for t in await _collect(other.stream_tokens("weights", max_tokens=6, temperature=0.0))]
        await triton.close()
    finally:
        server.stop()
    assert f"coordinator loaded {checkpoint.resolve()}" in server.log()
    assert ids == [t.token_id for t in await _collect(backend.stream_tokens("weights", max_tokens=6, temperature=0.0))]


def test_non_decoupled_config_fails_to_load(tmp_path, checkpoint):
    repo = tmp_path / "repo"
    model_dir = repo / "coordinator"
    shutil.copytree(TEMPLATE, model_dir, ignore=shutil.ignore_patterns("__pycache__", "checkpoint", "configs"))
    config = (model_dir / "config.pbtxt").read_text().replace("decoupled: true", "decoupled: false")
    config = config.replace('key: "checkpoint_dir" value: { string_value: "" }',
                            f'key: "checkpoint_dir" value: {{ string_value: "{checkpoint}" }}')
    (model_dir / "config.pbtxt").write_text(config)
    server = EmbeddedTriton(repo, tmp_path / "triton.log", startup_timeout_s=60)
    with pytest.raises(TritonStartError):
        server.start()
    assert "set model_transaction_policy { decoupled: true }" in server.log()


async def test_latency_measurement_reports_percentiles(backend):
    report = await measure_stream_latency(backend, "Latency", runs=2, warmup=1, max_tokens=8, temperature=0.0)
    assert report["tokens"] == 16 and report["mode"] == "raw_tokens"
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"]
    assert 0 < report["itl_ms"]["p50"] <= report["itl_ms"]["p99"]


# ------------------------------------------------------------------------------------------------ ThinkSplitter
def _split_all(splitter: ThinkSplitter, chunks: list[str]) -> dict[str, str]:
    out = {"thinking": "", "answer": ""}
    for chunk in chunks:
        for kind, text in splitter.feed(chunk):
            out[kind] += text
    for kind, text in splitter.flush():
        out[kind] += text
    return out


def _chunkings(text: str, rng: random.Random, count: int) -> list[list[str]]:
    result = [[c for c in text], [text]]
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
        result.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return result


@pytest.mark.parametrize(
    ("text", "start", "thinking", "answer"),
    [
        ("<think>\nLet me think.\n</think>\n\nThe answer.", None, "\nLet me think.\n", "\n\nThe answer."),
        ("  \n<think>plan</think>done", None, "plan", "done"),
        ("No reasoning here, <think> is literal", None, "", "No reasoning here, <think> is literal"),
        ("Okay, so tempo 120.\n</think>\n\nUse 120 BPM.", True, "Okay, so tempo 120.\n", "\n\nUse 120 BPM."),
        ("reasoning only, cut off <thi", True, "reasoning only, cut off <thi", ""),
        ("a</think>b</think>c<think>d", True, "a", "b</think>c<think>d"),
        ("stray close</think>answer", False, "", "stray closeanswer"),
        ("<thinking> is not a tag", None, "", "<thinking> is not a tag"),
        ("<th", None, "", "<th"),
    ],
)
def test_think_splitter_under_every_chunking(text, start, thinking, answer):
    rng = random.Random(text)
    for chunks in _chunkings(text, rng, 40):
        result = _split_all(ThinkSplitter(start_in_thinking=start), chunks)
        assert result == {"thinking": thinking, "answer": answer}, chunks


def test_think_splitter_holds_back_only_possible_tags():
    splitter = ThinkSplitter(start_in_thinking=True)
    assert splitter.feed("step one </th") == [("thinking", "step one ")]
    assert splitter.feed("ink>\n\nFinal") == [("answer", "\n\nFinal")]
    assert splitter.feed(" words") == [("answer", " words")]
    splitter = ThinkSplitter()
    assert splitter.feed("  ") == [] and splitter.feed("<th") == []
    assert splitter.feed("ink>x") == [("thinking", "x")]
    assert splitter.in_thinking


# ------------------------------------------------------------------------------------------------ OpenAI backend
@contextlib.asynccontextmanager
async def openai_server(handler):
    """A real HTTP server on loopback speaking OpenAI's chat-completions SSE protocol (the test double)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _chunk(delta: dict | None = None, finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "r1",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _sse_response(request, parts, *, delay: float = 0.0):
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for part in parts:
        await response.write(part)
        if delay:
            await asyncio.sleep(delay)
    return response


async def test_openai_backend_reasoning_content_deltas():
    seen: dict = {}

    async def handler(request):
        seen["body"] = await request.json()
        seen["auth"] = request.headers.get("Authorization")
        seen["request_id"] = request.headers.get("X-Request-Id")
        return await _sse_response(request, [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"reasoning_content": "The user wants"}),
            _chunk({"reasoning_content": " a beat."}),
            _chunk({"reasoning": " (newer field)"}),
            _chunk({"content": "\n\nHere is"}),
            _chunk({"content": " the beat."}),
            _chunk({}, finish="length"),
            b"data: [DONE]\n\n",
        ])

    async with openai_server(handler) as url:
        backend = OpenAICoordinatorBackend(url + "/v1", "deepseek-r1", api_key="sk-test")
        events = await _collect(backend.stream("make a beat", max_tokens=64, temperature=0.6, top_p=0.95, seed=5,
                                               stop=["###"], request_id="rid-7"))
        await backend.close()
    thinking = "".join(e.text for e in events if e.kind == "thinking")
    answer = "".join(e.text for e in events if e.kind == "answer")
    assert thinking == "The user wants a beat. (newer field)"
    assert answer == "\n\nHere is the beat."
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    assert [e.token_index for e in events[:-1]] == [0, 1, 2, 3, 4]
    body = seen["body"]
    assert body["messages"] == [{"role": "user", "content": "make a beat"}] and body["stream"] is True
    assert (body["model"], body["max_tokens"], body["seed"], body["stop"]) == ("deepseek-r1", 64, 5, ["###"])
    assert seen["auth"] == "Bearer sk-test" and seen["request_id"] == "rid-7"


async def test_openai_backend_inline_think_tags_split_across_chunks():
    async def handler(request):
        parts = ["<thi", "nk>\nHmm, drums", " first.</th", "ink>\n\nKick", " on one.", ""]
        return await _sse_response(request, [
            *(_chunk({"content": p}) for p in parts), _chunk({}, finish="stop"), b"data: [DONE]\n\n"])

    async with openai_server(handler) as url:
        backend = OpenAICoordinatorBackend(url, "ollama-r1")  # base URL without /v1 works too
        events = await _collect(backend.stream("drums"))
        await backend.close()
    assert "".join(e.text for e in events if e.kind == "thinking") == "\nHmm, drums first."
    assert "".join(e.text for e in events if e.kind == "answer") == "\n\nKick on one."
    assert "<" not in "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"


async def test_openai_backend_endpoint_down_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAICoordinatorBackend(url, "m", token_timeout_s=2.0)
    with pytest.raises(CoordinatorUnavailable) as info:
        await _collect(backend.stream("hi"))
    assert isinstance(info.value, Unavailable) and "127.0.0.1" in str(info.value)
    await backend.close()


async def test_openai_backend_stall_times_out_and_closes_the_stream():
    disconnected = asyncio.Event()

    async def handler(request):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk({"content": "first"}))
        try:
            for _ in range(200):  # keep-alive comments are not tokens: they must not reset the idle timer
                await asyncio.sleep(0.05)
                await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            disconnected.set()
            raise
        return response

    async with openai_server(handler) as url:
        backend = OpenAICoordinatorBackend(url, "m", token_timeout_s=0.5)
        started = time.monotonic()
        events: list[TokenEvent] = []
        with pytest.raises(CoordinatorTimeout) as info:
            async with contextlib.aclosing(backend.stream("hi")) as stream:
                async for event in stream:
                    events.append(event)
        assert time.monotonic() - started < 3.0
        assert [e.text for e in events] == ["first"]
        assert isinstance(info.value, DeadlineExceeded) and "no token" in str(info.value)
        await asyncio.wait_for(disconnected.wait(), 5.0)  # the server saw the client go away
        await backend.close()


async def test_openai_backend_consumer_break_closes_the_stream():
    disconnected = asyncio.Event()

    async def handler(request):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(400):
                await response.write(_chunk({"content": f"t{i} "}))
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            disconnected.set()
            raise
        return response

    async with openai_server(handler) as url:
        backend = OpenAICoordinatorBackend(url, "m")
        async with contextlib.aclosing(backend.stream("hi")) as stream:
            async for event in stream:
                if event.token_index >= 2:
                    break
        await asyncio.wait_for(disconnected.wait(), 5.0)
        await backend.close()


@pytest.mark.parametrize(
    ("status", "error"), [(500, CoordinatorUnavailable), (503, CoordinatorUnavailable), (400, CoordinatorRequestError)]
)
async def test_openai_backend_http_errors(status, error):
    from aiohttp import web

    async def handler(request):
        return web.json_response({"error": {"message": "model 'm' not served"}}, status=status)

    async with openai_server(handler) as url:
        backend = OpenAICoordinatorBackend(url, "m")
        with pytest.raises(error) as info:
            await _collect(backend.stream("hi"))
        assert str(status) in str(info.value) and "not served" in str(info.value)
        await backend.close()


async def test_openai_backend_error_chunk_and_truncated_stream():
    async def error_handler(request):
        return await _sse_response(request, [
            _chunk({"content": "ok"}), b'data: {"error": {"message": "CUDA out of memory"}}\n\n'])

    async def truncated_handler(request):
        return await _sse_response(request, [_chunk({"content": "partial"})])

    async with openai_server(error_handler) as url:
        backend = OpenAICoordinatorBackend(url, "m")
        with pytest.raises(CoordinatorStreamError, match="CUDA out of memory"):
            await _collect(backend.stream("hi"))
        await backend.close()
    async with openai_server(truncated_handler) as url:
        backend = OpenAICoordinatorBackend(url, "m")
        with pytest.raises(CoordinatorUnavailable, match="before completion"):
            await _collect(backend.stream("hi"))
        await backend.close()
