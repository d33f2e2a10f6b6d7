"""The workflow engine over real pattern memory: recall and store executors on a milvus-lite PatternStore, workflow
records in SQLite. The engine on its own (in-memory executors) is tested in tests/unit/test_workflow_engine.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from grym_synth.memory.learning import FeedbackStore
from grym_synth.memory.store import PatternStore
from grym_synth.planning.plan import Step
from grym_synth.planning.validation import validate_plan
from grym_synth.workflow.adapters import generate_params_from_pattern
from grym_synth.workflow.engine import WorkflowEngine
from grym_synth.workflow.events import WorkflowFinished
from grym_synth.workflow.executors import RecallExecutor, StepContext, StoreExecutor
from grym_synth.workflow.store import SqlWorkflowStore, open_workflow_store
from support import WORKFLOW_DIM as DIM
from support import Trace, analyze, analyzer, collect, gen, generator, plan_of


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlWorkflowStore]:
    s = open_workflow_store(f"sqlite://{tmp_path / 'workflows.db'}")
    yield s
    s.close()


@pytest.fixture
def patterns(tmp_path: Path) -> Iterator[PatternStore]:
    s = PatternStore(str(tmp_path / "milvus" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny")
    s.open()
    yield s
    s.close()


PROVENANCE = {"prompt": "calm piano", "negative_prompt": "noise", "seed": "41", "steps": "30",
              "guidance_scale": "3.0", "scheduler": "dpm", "duration_s": "4.0", "model": "audioldm"}


async def test_recall_vary_store_carries_the_recalled_seed_and_prompt(store: SqlWorkflowStore,
                                                                      patterns: PatternStore) -> None:
    original = await patterns.insert([1.0] * DIM, duration_s=4.0, tags={"mood": "calm"}, source="test",
                                     metadata=PROVENANCE)
    trace = Trace()
    executors = {"recall": RecallExecutor(patterns), "vary": generator(trace), "analyze": analyzer(trace),
                 "store": StoreExecutor(patterns)}
    plan = validate_plan({"version": 1, "intent": "like the calm one", "steps": [
        {"id": "vary", "type": "vary", "params": {"pattern_id": original.id, "strength": 0.5,
                                                  "prompt_suffix": "with strings"}},
        {"id": "ana", "type": "analyze", "inputs": {"audio": "vary"}},
        {"id": "keep", "type": "store", "params": {"tags": {"mood": "calm", "kind": "variation"}},
         "inputs": {"from": "ana.embedding"}},
    ]})
    engine = WorkflowEngine(executors, store)
    run = await engine.start(plan, request_text="like the calm one", request_id="req-3")
    events = await collect(run.events())
    assert isinstance(events[-1], WorkflowFinished), events[-1]
    params = trace.inputs["vary"]["params"]
    assert params == {"prompt": "calm piano, with strings", "negative_prompt": "noise", "seed": 42, "steps": 30,
                      "guidance_scale": 3.0, "scheduler": "dpm", "duration_s": 4.0, "model": "audioldm"}
    assert trace.inputs["vary"]["varied_from"] == original.id
    stored = await patterns.get(run.outputs["keep"]["pattern_id"])
    assert stored.tags == {"mood": "calm", "kind": "variation"}
    assert stored.metadata["seed"] == "42" and stored.metadata["varied_from"] == original.id
    assert stored.metadata["workflow_id"] == run.workflow_id and stored.metadata["original_seed"] == "41"
    assert generate_params_from_pattern(stored) == params, "a stored pattern regenerates exactly"
    assert run.audio()[0][0] == "vary"


async def test_recall_by_embedding_is_ranked_with_ratings(store: SqlWorkflowStore, patterns: PatternStore) -> None:
    """analyze → recall(embedding): similarity search in milvus-lite, re-ranked by ratings kept in the same
    SQLite database as the workflow records."""
    query = [1.0] + [0.0] * (DIM - 1)
    near = await patterns.insert([1.0, 0.1] + [0.0] * (DIM - 2), duration_s=1, tags={}, source="t")
    close = await patterns.insert([1.0, 0.3] + [0.0] * (DIM - 2), duration_s=1, tags={}, source="t")
    await patterns.insert([0.0, 1.0] + [0.0] * (DIM - 2), duration_s=1, tags={}, source="t")
    feedback = FeedbackStore(store.db).open()

    async def fixed_analysis(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"embedding": np.asarray(query, dtype=np.float32), "duration_s": 1.0}

    engine = WorkflowEngine({"generate": generator(Trace()), "analyze": fixed_analysis,
                             "recall": RecallExecutor(patterns, feedback)}, store)
    plan = plan_of(gen("g"), analyze("ana", "g"),
                   {"id": "similar", "type": "recall", "params": {"top_k": 2}, "inputs": {"embedding": "ana"}})

    async def recalled() -> list[str]:
        run = await engine.start(plan, request_text="x", request_id="req-14")
        await collect(run.events())
        return [p.id for p in run.outputs["similar"]["patterns"]]

    try:
        assert await recalled() == [near.id, close.id]
        for _ in range(3):
            await feedback.rate(close.id, 5)
        await feedback.rate(near.id, 1)
        assert await recalled() == [close.id, near.id]
    finally:
        feedback.close()
