"""Order in which Compose renders a piece's windows (GenerateExecutor's in-flight bound and its lead windows).

Pure scheduling logic: the generation itself is replaced by a coroutine that records when each window runs (the
real path is covered by tests/integration/test_compose_long.py on the real server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from grym_synth.compose.service import GenerateExecutor
from grym_synth.planning.plan import Step
from grym_synth.workflow.executors import StepContext


def _ctx(step_id: str, workflow_id: str = "w") -> StepContext:
    return StepContext(workflow_id=workflow_id, step_id=step_id, request_id="r", deadline=None,
                       _emit=lambda *a, **k: None)


def _executor(in_flight: int, log: list[str], fail: str = "") -> GenerateExecutor:
    ex = GenerateExecutor(generation=None, in_flight=in_flight)  # type: ignore[arg-type]

    async def run(step: Step, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        log.append(f"start {step.id}")
        await asyncio.sleep(0.01 if step.id.startswith("s1-") else 0.001)
        if step.id == fail:
            raise RuntimeError("boom")
        log.append(f"end {step.id}")
        return {}

    ex._run = run  # type: ignore[method-assign]
    return ex


async def _all(ex: GenerateExecutor, ids: list[str], workflow_id: str = "w") -> list[Any]:
    return await asyncio.gather(*(ex(Step(i, "generate", {}), {}, _ctx(i, workflow_id)) for i in ids),
                                return_exceptions=True)


async def test_lead_windows_finish_before_any_other_starts() -> None:
    log: list[str] = []
    ex = _executor(4, log)
    ex.lead("w", ["s1-w1", "s1-w2"])
    await _all(ex, ["s1-w1", "s1-w2", "s2-w1", "s2-w2", "s3-w1"])
    first_other = min(log.index(f"start {i}") for i in ("s2-w1", "s2-w2", "s3-w1"))
    assert max(log.index("end s1-w1"), log.index("end s1-w2")) < first_other
    assert sorted(x for x in log if x.startswith("end")) == sorted(
        f"end {i}" for i in ("s1-w1", "s1-w2", "s2-w1", "s2-w2", "s3-w1"))


async def test_in_flight_bound_holds_after_the_lead() -> None:
    log: list[str] = []
    ex = _executor(2, log)
    ex.lead("w", ["s1-w1"])
    await _all(ex, ["s1-w1", "s2-w1", "s2-w2", "s2-w3", "s2-w4"])
    running = peak = 0
    for entry in log:
        running += 1 if entry.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2


async def test_a_failed_lead_window_releases_the_others() -> None:
    """The engine fails the workflow and cancels the rest; the waiting windows must not hang meanwhile."""
    log: list[str] = []
    ex = _executor(4, log, fail="s1-w1")
    ex.lead("w", ["s1-w1"])
    results = await asyncio.wait_for(_all(ex, ["s1-w1", "s2-w1"]), 5)
    assert isinstance(results[0], RuntimeError) and results[1] == {}


async def test_without_a_bound_or_for_another_workflow_there_is_no_lead() -> None:
    log: list[str] = []
    ex = _executor(0, log)
    ex.lead("w", ["s1-w1"])  # ignored: no in-flight bound
    await _all(ex, ["s2-w1", "s1-w1"])
    assert log[0] == "start s2-w1"
    log.clear()
    ex = _executor(4, log)
    ex.lead("w", ["s1-w1"])
    await _all(ex, ["s2-w1"], workflow_id="other")
    assert log == ["start s2-w1", "end s2-w1"]
    ex.forget("w")
    await _all(ex, ["s2-w2"])
    assert log[-1] == "end s2-w2"


@pytest.mark.parametrize("ids", [[], ["s1-w1"]])
def test_lead_registers_only_with_windows(ids: list[str]) -> None:
    ex = GenerateExecutor(generation=None, in_flight=4)  # type: ignore[arg-type]
    ex.lead("w", ids)
    assert ("w" in ex._lead) == bool(ids)
