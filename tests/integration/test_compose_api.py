"""Compose through the real orchestrator, Triton (coordinator, AudioLDM, Wav2Vec2), milvus-lite and the workflow
store: token streaming, plan choice and fallback, DAG execution with context passing, cancellation, restart
recovery, pattern learning, and bad inputs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc
import pytest

from conftest import orchestrator_args
from grym import Client, GrymError, wav_from_events
from grym.v1 import orchestrator_pb2 as pb
from openai_double import OpenAIDouble
from grym_synth.inference.triton_process import EmbeddedTriton
from support import OrchestratorProcess, tone

TOKEN, PLAN, STEP, FEATURES, AUDIO, SUMMARY = "token", "plan", "step", "features", "audio", "summary"
SHORT_PLAN = {
    "version": 1, "intent": "short ambient sketch",
    "steps": [
        {"id": "a", "type": "generate", "params": {"prompt": "soft ambient pad with rain", "duration_s": 1.0,
                                                   "steps": 3, "seed": 11}},
        {"id": "b", "type": "generate", "params": {"prompt": "distant thunder, low drone", "duration_s": 1.0,
                                                   "steps": 3, "seed": 12}},
        {"id": "an", "type": "analyze", "inputs": {"audio": "a.audio"}},
        {"id": "st", "type": "store", "inputs": {"from": "an.embedding"}, "params": {"tags": {"part": "intro"}}},
    ],
    "output": ["a", "b"],
}


def kinds(events: list[pb.ComposeResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


@pytest.fixture(scope="module")
def double() -> OpenAIDouble:
    server = OpenAIDouble().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_orch(triton: EmbeddedTriton, double: OpenAIDouble, tmp_path_factory: pytest.TempPathFactory):
    orch = OrchestratorProcess(tmp_path_factory.mktemp("openai-orch"), orchestrator_args(
        triton, "--coordinator-backend", "openai", "--coordinator-openai-url", double.url,
        "--coordinator-token-timeout-s", "1.5")).start()
    yield orch
    orch.stop()


def test_triton_coordinator_streams_tokens_then_falls_back_to_rules(client: Client) -> None:
    """The seeded coordinator writes no JSON: its tokens stream first, then the rule-based plan runs."""
    events = list(client.compose("8 second ambient piece, rain, slow build", max_tokens=24, seed=3,
                                 tags={"session": "t1"}))
    k = kinds(events)
    first_plan = k.index(PLAN)
    assert k[0] == TOKEN and set(k[:first_plan]) == {TOKEN}
    assert k[-1] == SUMMARY and k.count(PLAN) == 1
    assert k.index(AUDIO) > max(i for i, x in enumerate(k) if x in (STEP, FEATURES))
    tokens = [e.token for e in events[:first_plan]]
    assert tokens[0].kind == pb.CoordinatorToken.KIND_THINKING  # the answer is prefilled with "<think>\n"
    assert [t.index for t in tokens] == sorted(t.index for t in tokens)
    plan = events[first_plan].plan
    assert plan.planner == pb.ComposePlan.PLANNER_RULES and plan.fallback_reason == "no JSON in the answer"
    steps = json.loads(plan.plan_json)["steps"]
    assert steps[0]["type"] == "generate" and json.loads(plan.plan_json)["duration_s"] == 8.0
    summary = events[-1].summary
    assert summary.state == pb.Workflow.STATE_SUCCEEDED and summary.planner == "rules"
    assert summary.audio_seconds == pytest.approx(8.0, abs=0.1) and len(summary.pattern_ids) == 1
    assert summary.thinking  # the transcript is kept with the record
    stored = client.get_pattern(summary.pattern_ids[0])
    assert stored.tags["session"] == "t1" and stored.metadata["prompt"]  # regenerable provenance
    assert len(wav_from_events(events)) > 8 * 16_000 * 2


def test_coordinator_plan_runs_as_a_dag_with_context_passing(openai_orch, double: OpenAIDouble) -> None:
    double.mode, double.plan = "plan", SHORT_PLAN
    with Client(openai_orch.target) as c:
        events = list(c.compose("a short ambient sketch with rain and thunder"))
        k = kinds(events)
        tokens = [e.token for e in events if e.WhichOneof("event") == TOKEN]
        assert {t.kind for t in tokens} == {pb.CoordinatorToken.KIND_THINKING, pb.CoordinatorToken.KIND_ANSWER}
        assert "".join(t.text for t in tokens if t.kind == pb.CoordinatorToken.KIND_THINKING).startswith(
            "The user wants")
        plan = next(e.plan for e in events if e.WhichOneof("event") == PLAN)
        assert plan.planner == pb.ComposePlan.PLANNER_COORDINATOR and not plan.fallback_reason
        # independent generate steps ran concurrently: b started before a finished
        order = [(e.step.step_id, e.step.state) for e in events if e.WhichOneof("event") == STEP
                 and e.step.state in (pb.ComposeStep.STATE_STARTED, pb.ComposeStep.STATE_FINISHED)]
        assert order.index(("b", pb.ComposeStep.STATE_STARTED)) < order.index(("a", pb.ComposeStep.STATE_FINISHED))
        features = [e.features for e in events if e.WhichOneof("event") == FEATURES]
        assert [f.step_id for f in features] == ["an"] and len(features[0].embedding) == 32
        summary = events[-1].summary
        assert summary.state == pb.Workflow.STATE_SUCCEEDED and summary.audio_seconds == pytest.approx(2.0, abs=0.1)
        stored = c.get_pattern(summary.pattern_ids[0])
        # context passing: the store step received a's provenance through analyze
        assert stored.metadata["prompt"] == "soft ambient pad with rain" and stored.metadata["seed"] == "11"
        assert stored.tags["part"] == "intro"
        assert k[-1] == SUMMARY


def test_recall_and_vary_carry_the_recalled_pattern(openai_orch, double: OpenAIDouble) -> None:
    """'like pattern X': recall X, vary it — the generate params come from X's stored prompt and seed."""
    double.mode = "garbage"  # the rule planner handles "like pattern <id>"
    with Client(openai_orch.target) as c:
        origin = list(c.generate("glassy bell arpeggio", seconds=1.0, steps=3, seed=4242, store=True))[-1].result
        events = list(c.compose(f"2 second piece like pattern {origin.pattern_id}"))
        plan = next(e.plan for e in events if e.WhichOneof("event") == PLAN)
        assert plan.planner == pb.ComposePlan.PLANNER_RULES and plan.fallback_reason == "no JSON in the answer"
        types = [s["type"] for s in json.loads(plan.plan_json)["steps"]]
        assert "recall" in types and "vary" in types
        vary = next(e.step for e in events if e.WhichOneof("event") == STEP and e.step.step_type == "vary"
                    and e.step.state == pb.ComposeStep.STATE_FINISHED)
        params = json.loads(vary.summary_json)["params"]
        # The variation keeps the pattern's tempo and key (its stored music descriptors), when it has them.
        music = origin.music
        kept = " ".join(([f"at {round(music.tempo_bpm)} BPM"] if music.tempo_bpm > 0 else []) +
                        ([f"in {music.key}"] if music.key else []))
        assert params["prompt"] == "glassy bell arpeggio" + (f", {kept}" if kept else "")
        assert int(params["seed"]) == 4243  # recalled seed + 1
        assert events[-1].summary.state == pb.Workflow.STATE_SUCCEEDED


def test_compose_recalls_a_pattern_stored_after_the_index_loaded(openai_orch, double: OpenAIDouble) -> None:
    """Recall runs on the in-memory index: a pattern stored after the index's full load reaches it through the
    store (no reload) and is given to the coordinator as context."""
    deadline = time.monotonic() + 30
    while "recall index loaded" not in openai_orch.log():
        assert time.monotonic() < deadline, "the recall index did not load"
        time.sleep(0.1)
    double.mode = "garbage"
    with Client(openai_orch.target) as c:
        stored = c.analyze(tone(1.0, freq=523.0, seed=77), sample_rate_hz=16_000, store=True,
                           tags={"mood": "zephyrine", "test": "recall-index"})
        stream = c.compose("a zephyrine sketch, 1 second")
        plan = next(e.plan for e in stream if e.WhichOneof("event") == PLAN)
        stream.close()
    assert stored.pattern_id in plan.recalled_pattern_ids


@pytest.mark.parametrize("mode,reason", [("stall", "no token"), ("bad_plan", "schema violation")])
def test_coordinator_stall_or_invalid_plan_falls_back(openai_orch, double: OpenAIDouble, mode: str,
                                                      reason: str) -> None:
    double.mode = "plan" if mode == "bad_plan" else mode
    double.plan = {**SHORT_PLAN, "steps": [{"id": "x", "type": "generate",
                                            "params": {"prompt": "p", "duration_s": 1.0, "steps": 500}}]}
    t0 = time.perf_counter()
    with Client(openai_orch.target) as c:
        events = list(c.compose("3 second calm piano"))
    plan = next(e.plan for e in events if e.WhichOneof("event") == PLAN)
    assert plan.planner == pb.ComposePlan.PLANNER_RULES and reason in plan.fallback_reason, plan.fallback_reason
    assert events[-1].summary.state == pb.Workflow.STATE_SUCCEEDED
    assert events[-1].summary.fallback_reason == plan.fallback_reason  # the record says what happened
    assert time.perf_counter() - t0 < 60


def test_openai_endpoint_down_falls_back_and_is_recorded(triton: EmbeddedTriton, tmp_path: Path) -> None:
    orch = OrchestratorProcess(tmp_path / "orch", orchestrator_args(
        triton, "--coordinator-backend", "openai", "--coordinator-openai-url", "http://127.0.0.1:9/v1")).start()
    try:
        with Client(orch.target) as c:
            events = list(c.compose("2 second drone"))
            plan = next(e.plan for e in events if e.WhichOneof("event") == PLAN)
            assert "coordinator unavailable" in plan.fallback_reason
            assert "127.0.0.1" not in plan.fallback_reason  # the endpoint stays in the server log
            record = c.get_workflow(events[-1].workflow_id)
            assert record.state == pb.Workflow.STATE_SUCCEEDED and "unavailable" in record.fallback_reason
    finally:
        orch.stop()


def test_cancel_stops_every_step_and_is_recorded(openai_orch, double: OpenAIDouble) -> None:
    double.mode = "plan"
    double.plan = {"version": 1, "intent": "long", "steps": [
        {"id": "g1", "type": "generate", "params": {"prompt": "slow pad", "duration_s": 2.0, "steps": 150}},
        {"id": "g2", "type": "generate", "params": {"prompt": "slow bass", "duration_s": 2.0, "steps": 150}}],
        "output": ["g1", "g2"]}
    with Client(openai_orch.target) as c:
        stream = c.compose("a long piece")
        workflow_id = ""
        for event in stream:
            workflow_id = event.workflow_id
            if event.WhichOneof("event") == STEP and event.step.state == pb.ComposeStep.STATE_PROGRESS \
                    and event.step.done >= 2:
                break
        stream.close()  # cancels the call
        deadline = time.monotonic() + 20
        while c.get_workflow(workflow_id).state == pb.Workflow.STATE_RUNNING and time.monotonic() < deadline:
            time.sleep(0.2)
        record = c.get_workflow(workflow_id)
        assert record.state == pb.Workflow.STATE_CANCELLED
        assert {s.state for s in record.steps} <= {"CANCELLED"}


def test_deadline_cancels_compose(openai_orch, double: OpenAIDouble) -> None:
    double.mode = "plan"
    double.plan = {"version": 1, "intent": "long", "steps": [
        {"id": "g", "type": "generate", "params": {"prompt": "slow pad", "duration_s": 2.0, "steps": 200}}],
        "output": ["g"]}
    with Client(openai_orch.target) as c, pytest.raises(GrymError) as err:
        list(c.compose("a long piece", timeout_s=3.0))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_workflow_records_survive_restart_and_crashes_are_interrupted(triton: EmbeddedTriton, double: OpenAIDouble,
                                                                      tmp_path: Path) -> None:
    args = orchestrator_args(triton, "--coordinator-backend", "openai", "--coordinator-openai-url", double.url)
    first = OrchestratorProcess(tmp_path / "data", args).start()
    double.mode, double.plan = "plan", SHORT_PLAN
    with Client(first.target) as c:
        done = list(c.compose("short sketch"))[-1].summary
        double.plan = {"version": 1, "intent": "long", "steps": [
            {"id": "g", "type": "generate", "params": {"prompt": "slow pad", "duration_s": 2.0, "steps": 200}}],
            "output": ["g"]}
        running = ""
        for event in c.compose("a long piece"):
            running = event.workflow_id
            if event.WhichOneof("event") == STEP and event.step.state == pb.ComposeStep.STATE_PROGRESS:
                # A crash while the stream is still open: no chance to record anything. (Leaving the loop
                # first would cancel the call, and the server would rightly record CANCELLED.)
                first.stop(signal.SIGKILL)
                break

    second = OrchestratorProcess(tmp_path / "data", args).start()
    try:
        with Client(second.target) as c:
            again = c.get_workflow(done.workflow_id)
            assert again.state == pb.Workflow.STATE_SUCCEEDED and list(again.pattern_ids) == list(done.pattern_ids)
            crashed = c.get_workflow(running)
            assert crashed.state == pb.Workflow.STATE_INTERRUPTED and crashed.error
            listed = [w.workflow_id for w in c.list_workflows()]
            assert listed[:2] == [running, done.workflow_id]  # newest first
            assert c.get_pattern(done.pattern_ids[0]).pattern_id == done.pattern_ids[0]  # nothing stored was lost
    finally:
        second.stop()


def test_clusters_and_ratings(client: Client) -> None:
    ids = {}
    for group, freq in (("low", 110.0), ("high", 1760.0)):
        for i in range(4):
            r = client.analyze(tone(1.0, freq=freq * (1 + 0.01 * i), seed=900 + i), sample_rate_hz=16_000,
                               store=True, tags={"register": group, "test": "clusters"})
            ids.setdefault(group, []).append(r.pattern_id)
    clusters = client.clusters()
    assert clusters and sum(c.size for c in clusters) >= 8
    for group in ids.values():  # each synthetic family lands in one cluster
        assert any(set(group) <= set(c.pattern_ids) for c in clusters), group
    rated = client.rate(ids["low"][0], 5, "lovely")
    rated = client.rate(ids["low"][0], 3)
    assert rated.rating_count == 2 and rated.mean_rating == pytest.approx(4.0)
    with pytest.raises(GrymError) as err:
        client.rate("00000000-0000-0000-0000-000000000000", 4)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(GrymError) as err:
        client.rate(ids["low"][0], 6)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


BAD = [
    ({"request": ""}, "request is empty"),
    ({"request": "x" * 4001}, "at most 4000"),
    ({"request": "ambient", "max_tokens": 9000}, "max_tokens"),
    ({"request": "ambient", "tags": {"bad key": "v"}}, "key"),
]


@pytest.mark.parametrize("fields,says", BAD, ids=[s for _, s in BAD])
def test_bad_compose_requests(client: Client, fields: dict, says: str) -> None:
    before = len(client.list_workflows(page_size=500))
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Compose(pb.ComposeRequest(**fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.details()
    assert len(client.list_workflows(page_size=500)) == before


def test_unknown_workflow_is_not_found(client: Client) -> None:
    with pytest.raises(GrymError) as err:
        client.get_workflow("no-such-workflow")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
