"""The workflow engine with in-memory executors: DAG concurrency, context adapters, failure propagation,
cancellation and deadlines. Executors are small in-test functions (the engine is what is under test); workflow
records go to a SQLite file. Recall and store over a real pattern store (milvus-lite) are in
tests/integration/test_workflow.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grym_synth.core.errors import FailedPrecondition, Unavailable
from grym_synth.memory.audio_store import AUDIO_SHA_KEY
from grym_synth.memory.store import PatternRecord
from grym_synth.planning.plan import Ref, Step
from grym_synth.workflow.adapters import Link, RecallToContinue, RecallToVary
from grym_synth.workflow.engine import WorkflowEngine
from grym_synth.workflow.events import (PlanAccepted, StepCancelled, StepFailed, StepFinished, StepProgress,
                                        StepStarted, WorkflowCancelled, WorkflowEvent, WorkflowFailed, WorkflowFinished)
from grym_synth.workflow.executors import StepContext
from grym_synth.workflow.store import SqlWorkflowStore, StepState, WorkflowState, open_workflow_store
from support import RATE, Trace, analyze, analyzer, collect, gen, generator, hanging, kinds, plan_of


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlWorkflowStore]:
    s = open_workflow_store(f"sqlite://{tmp_path / 'workflows.db'}")
    yield s
    s.close()


# --- running a DAG ----------------------------------------------------------------------------------------------------
async def test_independent_steps_overlap_and_dependents_wait(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": generator(trace, 0.5), "analyze": analyzer(trace)}, store)
    plan = plan_of(gen("gen-1"), gen("gen-2"), analyze("ana-1", "gen-1"))
    t0 = time.monotonic()
    run = await engine.start(plan, request_text="two pieces", request_id="req-1")
    events = await collect(run.events())
    elapsed = time.monotonic() - t0
    assert isinstance(events[-1], WorkflowFinished)
    assert trace.at("gen-2", "start") < trace.at("gen-1", "end"), "independent steps run at the same time"
    assert trace.at("gen-1", "start") < trace.at("gen-2", "end")
    assert elapsed < 0.95, f"two 0.5 s steps in parallel took {elapsed:.2f} s (in a row: over 1 s)"
    assert trace.at("ana-1", "start") >= trace.at("gen-1", "end"), "a dependent waits for its input"


async def test_event_stream_summaries_and_record(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": generator(trace, 0.02), "analyze": analyzer(trace)}, store)
    plan = plan_of(gen("gen-1", duration_s=3), gen("gen-2", duration_s=2), analyze("ana", "gen-2"))
    run = await engine.start(plan, request_text="calm piano", request_id="req-2", thinking="hmm", answer="{}")
    events: list[WorkflowEvent] = []
    async for event in run.events():
        events.append(event)
        if isinstance(event, WorkflowFinished):
            stored = await store.get(run.workflow_id)
            assert stored.state == WorkflowState.SUCCEEDED, "the terminal event follows the stored final state"
    assert isinstance(events[0], PlanAccepted) and events[0].planner == "coordinator"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for step_id in ("gen-1", "gen-2"):
        assert kinds(events, step_id) == ["step_started"] + ["step_progress"] * 4 + ["step_finished"]
    assert kinds(events, "ana") == ["step_started", "step_finished"]
    for event in events:
        json.dumps(event.to_dict())  # every event is JSON-safe
    finished = next(e for e in events if isinstance(e, StepFinished) and e.step_id == "gen-1")
    assert finished.summary["audio"] == {"shape": [300], "dtype": "float32", "finite": True,
                                         "rms": pytest.approx(1.0, abs=0.2)}, "never raw audio"
    assert finished.summary["provenance"]["prompt"] == "calm piano"
    progress = next(e for e in events if isinstance(e, StepProgress))
    assert (progress.done, progress.total, progress.message) == (1, 4, "denoising")
    summary = events[-1].summary  # type: ignore[attr-defined]
    assert summary["audio_s"] == 5.0 and summary["output"] == ["gen-1", "gen-2"]
    assert [sid for sid, _ in run.audio()] == ["gen-1", "gen-2"] and run.audio()[0][1]["audio"].shape == (300,)
    record = await store.get(run.workflow_id)
    assert [s.state for s in record.steps] == [StepState.SUCCEEDED] * 3
    assert record.transcript_thinking == "hmm" and record.request_id == "req-2"
    assert record.step("gen-1").summary == finished.summary
    assert trace.inputs["ana"]["provenance"]["seed"] == plan.step("gen-2").params["seed"], "provenance flows on"


# --- context adapters ---------------------------------------------------------------------------------------------
PROVENANCE = {"prompt": "calm piano", "negative_prompt": "noise", "seed": "41", "steps": "30",
              "guidance_scale": "3.0", "scheduler": "dpm", "duration_s": "4.0", "model": "audioldm"}


def link_to(record: PatternRecord, **vary_params: Any) -> Link:
    recall = Step("r", "recall", {"pattern_id": record.id})
    vary = Step("v", "vary", {"strength": 0.35, "variation": 1, **vary_params}, {"from": Ref("r", "pattern")})
    return Link("from", Ref("r", "pattern"), recall, {"pattern": record, "patterns": [record]}, vary, "wf")


def pattern(metadata: dict[str, str], tags: dict[str, str] | None = None) -> PatternRecord:
    return PatternRecord(id="p-1", model="wav2vec2", profile="tiny", duration_s=45.0, tags=tags or {},
                         created_at_us=0, source="t", metadata=metadata)


def test_recall_to_vary_strength_and_overrides() -> None:
    adapter = RecallToVary()
    exact = adapter(link_to(pattern(PROVENANCE), strength=0.0))["params"]
    assert exact["seed"] == 41 and exact["prompt"] == "calm piano", "strength 0 re-renders the original"
    third = adapter(link_to(pattern(PROVENANCE), variation=3, steps=10, duration_s=8.0))["params"]
    assert (third["seed"], third["steps"], third["duration_s"], third["scheduler"]) == (44, 10, 8.0, "dpm")
    pinned = adapter(link_to(pattern(PROVENANCE), seed=7))["params"]
    assert pinned["seed"] == 7
    top = adapter(link_to(pattern({**PROVENANCE, "seed": str(2**63 - 1)})))["params"]
    assert top["seed"] == 0, "seed arithmetic wraps inside 0..2**63-1"


def test_recall_to_vary_without_provenance_uses_tags() -> None:
    params = RecallToVary()(link_to(pattern({}, tags={"mood": "dark", "genre": "techno"})))["params"]
    assert params["prompt"] == "music, techno, dark"
    assert params["duration_s"] == 30.0, "an uploaded 45 s clip varies as one 30 s segment"
    with pytest.raises(FailedPrecondition, match="found no pattern"):
        RecallToVary()(Link("from", Ref("r", "pattern"), Step("r", "recall", {}), {"pattern": None, "patterns": []},
                            Step("v", "vary", {"strength": 0.3}), "wf"))


def test_recall_to_continue_needs_stored_audio_and_moves_the_seed() -> None:
    def link(record: PatternRecord, **params: Any) -> Link:
        return Link("from", Ref("r", "pattern"), Step("r", "recall", {}), {"pattern": record, "patterns": [record]},
                    Step("c", "continue", {"duration_s": 5.0, **params}), "wf")

    with pytest.raises(FailedPrecondition, match="has no stored audio"):
        RecallToContinue()(link(pattern(PROVENANCE)))
    with_audio = pattern({**PROVENANCE, AUDIO_SHA_KEY: "ab" * 32})
    got = RecallToContinue()(link(with_audio, prompt_suffix="darker", steps=3))
    assert got["init_pattern_id"] == "p-1" and got["continued_from"] == "p-1" and got["original_seed"] == 41
    assert (got["params"]["seed"], got["params"]["duration_s"], got["params"]["steps"]) == (42, 5.0, 3)
    assert got["params"]["prompt"] == "calm piano, darker"
    assert RecallToContinue()(link(with_audio, seed=7))["params"]["seed"] == 7


# --- failure and cancellation -----------------------------------------------------------------------------------------
async def test_failure_fails_fast_and_cancels_the_rest(store: SqlWorkflowStore) -> None:
    trace = Trace()
    gens = {"bad": generator(trace, 0.05, fail={"bad": Unavailable("triton:audioldm", "model not ready")}),
            "slow": generator(trace, 10.0)}

    async def generate(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return await gens[step.id](step, inputs, ctx)  # type: ignore[no-any-return]

    engine = WorkflowEngine({"generate": generate, "analyze": analyzer(trace)}, store)
    plan = plan_of(gen("bad"), gen("slow"), analyze("ana", "bad"))
    t0 = time.monotonic()
    run = await engine.start(plan, request_text="x", request_id="req-4")
    events = await collect(run.events())
    assert time.monotonic() - t0 < 3.0
    assert "slow" in trace.saw("cancelled"), "a running sibling is cancelled"
    assert "ana" not in trace.saw("start"), "a dependent of the failed step never runs"
    failed = next(e for e in events if isinstance(e, StepFailed))
    assert (failed.step_id, failed.code) == ("bad", "UNAVAILABLE") and "model not ready" in failed.error
    cancelled = {e.step_id: e.reason for e in events if isinstance(e, StepCancelled)}
    assert set(cancelled) == {"slow", "ana"} and "workflow failed at step 'bad'" in cancelled["ana"]
    end = events[-1]
    assert isinstance(end, WorkflowFailed) and end.failed_step == "bad" and end.code == "UNAVAILABLE"
    record = await store.get(run.workflow_id)
    assert record.state == WorkflowState.FAILED and "step 'bad' failed" in (record.error or "")
    assert {s.step_id: s.state for s in record.steps} == {
        "bad": StepState.FAILED, "slow": StepState.CANCELLED, "ana": StepState.CANCELLED}
    assert record.step("bad").error_code == "UNAVAILABLE"


async def test_without_fail_fast_independent_branches_finish(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": generator(trace, 0.1, fail={"bad": RuntimeError("boom")}),
                             "analyze": analyzer(trace)}, store, fail_fast=False)
    plan = plan_of(gen("bad"), gen("good"), analyze("ana-bad", "bad"), analyze("ana-good", "good"))
    run = await engine.start(plan, request_text="x", request_id="req-5")
    events = await collect(run.events())
    assert trace.saw("end") >= {"good", "ana-good"} and "cancelled" not in {w for _, w, _ in trace.marks}
    failed = next(e for e in events if isinstance(e, StepFailed))
    assert failed.code == "INTERNAL", "an unexpected error is INTERNAL"
    assert "boom" not in failed.error and "RuntimeError" not in failed.error, "its details stay in the log"
    assert [e.step_id for e in events if isinstance(e, StepCancelled)] == ["ana-bad"]
    assert isinstance(events[-1], WorkflowFailed)
    record = await store.get(run.workflow_id)
    assert record.step("ana-good").state == StepState.SUCCEEDED and record.step("ana-bad").state == StepState.CANCELLED
    assert "upstream step 'bad' failed" in (record.step("ana-bad").error or "")


async def test_consumer_cancellation_reaches_running_steps(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": hanging(trace), "analyze": analyzer(trace)}, store)
    plan = plan_of(gen("a"), gen("b"), analyze("ana", "a"))
    run = await engine.start(plan, request_text="x", request_id="req-6")
    both_started = asyncio.Event()
    seen: list[WorkflowEvent] = []

    async def consume() -> None:
        async for event in run.events():
            seen.append(event)
            if sum(isinstance(e, StepStarted) for e in seen) == 2:
                both_started.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(both_started.wait(), 10)
    consumer.cancel()  # what grpc.aio does when the client goes away
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert trace.saw("cancelled") == {"a", "b"}, "every running executor saw CancelledError"
    assert run.state == WorkflowState.CANCELLED
    record = await store.get(run.workflow_id)
    assert record.state == WorkflowState.CANCELLED and record.error == "the client stopped listening"
    assert all(s.state == StepState.CANCELLED for s in record.steps)
    assert record.step("a").error == "cancelled: the client stopped listening"
    assert not engine.active


async def test_leaving_the_stream_early_cancels(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": hanging(trace)}, store)
    run = await engine.start(plan_of(gen("a")), request_text="x", request_id="req-7")
    events = run.events()
    async for event in events:
        if isinstance(event, StepStarted):
            break
    await events.aclose()  # type: ignore[attr-defined]
    assert trace.saw("cancelled") == {"a"}
    assert (await store.get(run.workflow_id)).state == WorkflowState.CANCELLED


async def test_deadline_cancels_running_steps(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": hanging(trace)}, store)
    run = await engine.start(plan_of(gen("a"), gen("b")), request_text="x", request_id="req-8",
                             deadline=time.monotonic() + 0.3)
    events = await collect(run.events())
    assert trace.saw("cancelled") == {"a", "b"}
    end = events[-1]
    assert isinstance(end, WorkflowFailed) and end.code == "DEADLINE_EXCEEDED" and end.failed_step is None
    assert (await store.get(run.workflow_id)).state == WorkflowState.FAILED


async def test_explicit_cancel_and_shutdown(store: SqlWorkflowStore) -> None:
    trace = Trace()
    engine = WorkflowEngine({"generate": hanging(trace)}, store)
    first = await engine.start(plan_of(gen("a")), request_text="x", request_id="req-9")
    second = await engine.start(plan_of(gen("b")), request_text="y", request_id="req-10")
    await asyncio.sleep(0.05)
    await first.cancel("user pressed stop")
    assert (await store.get(first.workflow_id)).error == "user pressed stop"
    await engine.shutdown()
    assert await second.wait() == WorkflowState.CANCELLED
    assert (await store.get(second.workflow_id)).error == "the orchestrator is shutting down"
    events = await collect(second.events())
    assert isinstance(events[-1], WorkflowCancelled), "a late consumer still gets the whole stream"


async def test_executor_missing_an_output_fails_its_own_step(store: SqlWorkflowStore) -> None:
    async def silent(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"sample_rate_hz": RATE}

    engine = WorkflowEngine({"generate": silent, "analyze": analyzer(Trace())}, store)
    run = await engine.start(plan_of(gen("g"), analyze("ana", "g")), request_text="x", request_id="req-11")
    events = await collect(run.events())
    failed = next(e for e in events if isinstance(e, StepFailed))
    assert failed.step_id == "g" and "returned no 'audio' output, which step 'ana' needs" in failed.error


async def test_a_cancellation_escaping_an_executor_fails_its_step(store: SqlWorkflowStore) -> None:
    async def leaky(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        raise asyncio.CancelledError()  # e.g. a downstream call's cancellation that the executor let through

    engine = WorkflowEngine({"generate": leaky, "analyze": analyzer(Trace())}, store, fail_fast=False)
    run = await engine.start(plan_of(gen("g"), analyze("ana", "g")), request_text="x", request_id="req-13")
    events = await collect(run.events())
    failed = next(e for e in events if isinstance(e, StepFailed))
    assert failed.step_id == "g" and failed.code == "CANCELLED"
    assert isinstance(events[-1], WorkflowFailed), "never reported as succeeded"


async def test_plan_needs_an_executor_per_step_type(store: SqlWorkflowStore) -> None:
    engine = WorkflowEngine({"generate": hanging(Trace())}, store)
    with pytest.raises(FailedPrecondition, match="no executor for step type"):
        await engine.start(plan_of(gen("g"), analyze("ana", "g")), request_text="x", request_id="req-12")
    page, _ = await store.list(page_size=10)
    assert page == [], "nothing is recorded for a plan that cannot start"


def test_patterns_from_the_generate_rpc_regenerate_as_recorded() -> None:
    """Metadata written by grym_synth.generation.service (same keys) is reproduced as recorded, beyond plan ranges."""
    recorded = {"prompt": "rain on a tin roof", "negative_prompt": "", "seed": "123", "steps": "150",
                "guidance_scale": repr(7.5), "duration_s": repr(5.0), "scheduler": "euler", "model": "audioldm",
                "profile": "tiny"}
    params = RecallToVary()(link_to(pattern(recorded), strength=0.0))["params"]
    assert params == {"prompt": "rain on a tin roof", "negative_prompt": "", "seed": 123, "steps": 150,
                      "guidance_scale": 7.5, "duration_s": 5.0, "scheduler": "euler", "model": "audioldm"}
