"""The constrained coordinator on a real tritonserver: seeded (random) Qwen2 weights write plans that the server's
plan choice takes from the coordinator, the stream still reasons before it answers, and a small token budget still
closes the JSON (or the fallback says why). One private Triton holding only the coordinator, as in
test_coordinator.py."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from grym_synth.compose.service import compose_prompt
from grym_synth.coordinator.base import CoordinatorRequestError
from grym_synth.coordinator.grammar import plan_answer_schema
from grym_synth.coordinator.triton_backend import TritonCoordinatorBackend
from grym_synth.inference.export.repository import build_repository
from grym_synth.inference.triton_client import TritonClient
from grym_synth.inference.triton_process import EmbeddedTriton
from grym_synth.planning.choose import choose_plan
from grym_synth.planning.rules import RuleBasedPlanner

REQUESTS = ["a 10 second calm piano melody", "90 second ambient piece, rain, slow build",
            "energetic drum loop, 12 seconds", "sad violin and cello duet, fade out", "Музыка: 20 с, тихо 🎻"]


@pytest.fixture(scope="module")
def coord_triton(tmp_path_factory):
    repo = tmp_path_factory.mktemp("constrained_repo")
    build_repository("tiny", repo, seed=0, models=["coordinator"], force=True)
    server = EmbeddedTriton(repo, tmp_path_factory.mktemp("constrained_triton") / "triton.log")
    server.start()
    server.wait_models_ready(["coordinator"], timeout_s=120)
    yield server
    server.stop()


@pytest.fixture
async def triton_client(coord_triton):
    triton = TritonClient(coord_triton.grpc_url, headers=coord_triton.auth_headers or None)
    yield triton
    await triton.close()


async def _events(backend, prompt: str, **kwargs) -> list:
    async with contextlib.aclosing(backend.stream(prompt, **kwargs)) as stream:
        return [event async for event in stream]


def _answer(events) -> str:
    return "".join(e.text for e in events if e.kind == "answer")


@pytest.mark.parametrize("seed", [0, 1])
async def test_seeded_weights_write_plans_the_server_takes_from_the_coordinator(triton_client, seed) -> None:
    backend = TritonCoordinatorBackend(triton_client, token_timeout_s=30, json_schema=plan_answer_schema())
    for i, request in enumerate(REQUESTS):
        events = await _events(backend, compose_prompt(request, []), max_tokens=512, temperature=0.6, top_p=0.95,
                               seed=seed * 100 + i)
        answer = _answer(events)
        plan = choose_plan(answer, request, [], RuleBasedPlanner())
        assert plan.planner == "coordinator", (plan.fallback_reason, answer)
        assert json.loads(answer)["version"] == 1  # the whole answer is the JSON, nothing around it
        assert events[-1].finish_reason == "stop"


async def test_the_stream_reasons_first_then_answers(triton_client) -> None:
    backend = TritonCoordinatorBackend(triton_client, token_timeout_s=30, json_schema=plan_answer_schema())
    events = await _events(backend, compose_prompt(REQUESTS[0], []), max_tokens=400, temperature=0.6, seed=3)
    kinds = [e.kind for e in events if e.text]
    assert kinds[0] == "thinking" and kinds[-1] == "answer"
    assert kinds == sorted(kinds, key=lambda k: k == "answer")  # thinking, then only answer
    thinking = "".join(e.text for e in events if e.kind == "thinking")
    assert thinking and "</think>" not in thinking and "</think>" not in _answer(events)
    # the thinking budget (max_tokens - answer_reserve_tokens 256) forced </think>: 400 tokens in all at most
    assert events[-1].token_index < 400


@pytest.mark.parametrize("max_tokens", [80, 120, 200])
async def test_small_budgets_still_close_the_json(triton_client, max_tokens) -> None:
    backend = TritonCoordinatorBackend(triton_client, token_timeout_s=30, json_schema=plan_answer_schema())
    for seed in range(3):
        events = await _events(backend, compose_prompt(REQUESTS[1], []), max_tokens=max_tokens, temperature=0.6,
                               seed=seed)
        plan = choose_plan(_answer(events), REQUESTS[1], [], RuleBasedPlanner())
        assert plan.planner == "coordinator", (max_tokens, seed, plan.fallback_reason, _answer(events))
        assert events[-1].token_index < max_tokens


async def test_a_budget_too_small_for_any_plan_falls_back_with_a_reason(triton_client) -> None:
    backend = TritonCoordinatorBackend(triton_client, token_timeout_s=30, json_schema=plan_answer_schema())
    events = await _events(backend, compose_prompt(REQUESTS[0], []), max_tokens=24, temperature=0.6, seed=1)
    assert events[-1].finish_reason == "length"
    assert {e.kind for e in events if e.text} == {"thinking"}  # no reserve for an answer that cannot fit
    plan = choose_plan(_answer(events), REQUESTS[0], [], RuleBasedPlanner())
    assert plan.planner == "rules" and plan.fallback_reason == "no JSON in the answer"


async def test_without_a_schema_the_answer_is_free_text(triton_client) -> None:
    backend = TritonCoordinatorBackend(triton_client, token_timeout_s=30)
    events = await _events(backend, "hello", max_tokens=300, temperature=1.0, seed=2)
    with pytest.raises(json.JSONDecodeError):
        json.loads(_answer(events) or "not json")


async def test_a_schema_that_cannot_compile_is_an_invalid_request(triton_client) -> None:
    backend = TritonCoordinatorBackend(triton_client, token_timeout_s=30,
                                       json_schema={"type": "object", "properties": {"a": {"$ref": "#/nope"}}})
    with pytest.raises(CoordinatorRequestError, match="json_schema cannot be used"):
        await _events(backend, "x", max_tokens=5)


async def test_vllm_protocol_sends_guided_decoding() -> None:
    """(async: TritonClient opens its aio channel on the running loop.)"""
    backend = TritonCoordinatorBackend(TritonClient("127.0.0.1:1"), protocol="vllm", json_schema={"type": "object"})
    inputs, _ = backend._inputs("x", 10, 0.6, 0.95, 1, None)
    sampling = json.loads(inputs["sampling_parameters"][0])
    assert sampling["guided_decoding"] == {"json": {"type": "object"}} and sampling["max_tokens"] == 10
    grym = TritonCoordinatorBackend(TritonClient("127.0.0.1:1"), json_schema={"type": "object"})
    grym_inputs, _ = grym._inputs("x", 10, None, None, None, None)
    assert json.loads(grym_inputs["json_schema"][0]) == {"type": "object"}
    assert grym_inputs["json_schema"].dtype == np.object_


async def test_openai_backend_asks_for_the_plan_schema_as_structured_output() -> None:
    """vLLM cannot run here: a loopback server speaking OpenAI's SSE protocol stands in for it (as in
    test_coordinator.py) and records what a vLLM server would receive."""
    from test_coordinator import _chunk, _sse_response, openai_server

    from grym_synth.coordinator.openai_backend import OpenAICoordinatorBackend

    seen: dict = {}
    plan = {"version": 1, "intent": "calm", "steps": [{"id": "g", "type": "generate", "params": {"prompt": "p"}}]}

    async def handler(request):
        seen["body"] = await request.json()
        return await _sse_response(request, [_chunk({"reasoning_content": "short"}),
                                             _chunk({"content": json.dumps(plan)}), _chunk({}, finish="stop"),
                                             b"data: [DONE]\n\n"])

    async with openai_server(handler) as url:
        backend = OpenAICoordinatorBackend(url, "r1", json_schema=plan_answer_schema())
        events = await _events(backend, "calm piano", max_tokens=64)
        await backend.close()
    fmt = seen["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == plan_answer_schema()
    assert fmt["json_schema"]["strict"] is True
    assert choose_plan(_answer(events), "calm piano", [], RuleBasedPlanner()).planner == "coordinator"


@pytest.mark.parametrize("request_text", ["3 second calm piano", "a dark drone with rain, 20 seconds, slow build",
                                          "energetic drums"])
def test_compose_on_the_real_server_takes_the_seeded_coordinators_plan(client, request_text) -> None:
    """Acceptance, through the public API: the shared orchestrator's Triton coordinator (seeded weights, default
    token budget) streams its reasoning, then an answer whose plan the server takes (PLANNER_COORDINATOR). The
    stream is left once the plan is known: the plan's audio is not what this checks."""
    from grym.v1 import orchestrator_pb2 as pb

    kinds = []
    for event in client.compose(request_text, seed=7):
        kind = event.WhichOneof("event")
        if kind == "token":
            kinds.append(event.token.kind)
        elif kind == "plan":
            plan = event.plan
            break
    assert plan.planner == pb.ComposePlan.PLANNER_COORDINATOR and not plan.fallback_reason, plan.fallback_reason
    # Thinking (if any: with the sectioned schema the seeded tokenizer's shortest answer takes the whole default
    # budget, so </think> is forced at once) always precedes the answer.
    assert kinds == sorted(kinds) and kinds[-1] == pb.CoordinatorToken.KIND_ANSWER
    data = json.loads(plan.plan_json)
    assert data["steps"] and {s["type"] for s in data["steps"]} <= {"generate", "store"}


def test_a_request_longer_than_the_coordinators_context_gets_the_rule_plan(client) -> None:
    """The prompt is the server's text around the request: when it overflows the model's context (2048 positions in
    the tiny profile), the recalled context is dropped first, then the rule planner plans, saying why; the caller
    never sees the coordinator's own refusal."""
    from grym.v1 import orchestrator_pb2 as pb

    request = "3 second calm piano with soft rain and distant bells, " * 70  # ~3900 characters
    for event in client.compose(request[:4000], seed=3):
        if event.WhichOneof("event") == "plan":
            plan = event.plan
            break
    assert plan.planner == pb.ComposePlan.PLANNER_RULES
    assert "context" in plan.fallback_reason, plan.fallback_reason
