"""Conversion between protobuf and the service layer, without a server: api/convert.py (records -> messages) and the
servicer's pure helpers (request -> GenerateParams, PCM encodings, events -> ComposeResponse, audio chunks, request
ids, undecodable requests), plus the enum lists that must agree across the proto, the server and the client."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from grym_synth.api import convert
from grym_synth.api.servicer import (SCHEDULER_NAMES, OrchestratorService, _audio_chunks, _compose_message, _encoding,
                                     _generate_params, _lenient, _request_id, _status_error, _Undecodable)
from grym_synth.api.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.compose.service import Features, Finished, PlanChosen
from grym_synth.coordinator.base import TokenEvent
from grym_synth.core.errors import InvalidArgument
from grym_synth.generation.service import DEFAULT_SCHEDULER, SCHEDULERS, AudioData
from grym_synth.memory.learning import Cluster
from grym_synth.memory.store import PatternRecord
from grym_synth.planning import schema
from grym_synth.planning.validation import validate_plan
from grym_synth.workflow.events import StepCancelled, StepFailed, StepFinished, StepProgress, StepStarted
from grym_synth.workflow.store import StepRecord, StepState, WorkflowRecord, WorkflowState

PLAN = {"version": 1, "intent": "calm piano", "steps": [
    {"id": "gen", "type": "generate", "params": {"prompt": "calm piano", "duration_s": 2}},
    {"id": "ana", "type": "analyze", "inputs": {"audio": "gen.audio"}},
]}


def record(**fields: object) -> WorkflowRecord:
    base = dict(id="wf-1", request_text="calm piano", request_id="rid-1", planner="rules", plan=PLAN,
                state=WorkflowState.SUCCEEDED, fallback_reason="no JSON in the answer",
                steps=[StepRecord("gen", "generate", StepState.SUCCEEDED, summary={"audio": {"shape": [200]}}),
                       StepRecord("ana", "analyze", StepState.FAILED, error="model not ready",
                                  error_code="UNAVAILABLE")],
                summary={"patterns": ["p-1", "p-2"], "audio_s": 2.5}, transcript_thinking="hmm",
                transcript_answer="{}", created_at_us=1_700_000_000_123_456, updated_at_us=1_700_000_001_000_000)
    return WorkflowRecord(**(base | fields))  # type: ignore[arg-type]


# --- api/convert.py -------------------------------------------------------------------------------------------------
def test_every_workflow_state_has_a_proto_value_and_back() -> None:
    assert set(convert.WORKFLOW_STATES) == set(WorkflowState)
    assert all(pb.Workflow.State.Name(v) == f"STATE_{s.value}" for s, v in convert.WORKFLOW_STATES.items())
    assert {convert.STATE_FROM_PROTO[v] for v in convert.WORKFLOW_STATES.values()} == set(WorkflowState)


def test_timestamp_and_json() -> None:
    assert convert.timestamp(1_700_000_000_123_456).ToMicroseconds() == 1_700_000_000_123_456
    assert convert.timestamp(0).ToMicroseconds() == 0
    assert convert.timestamp(None).ToMicroseconds() == 0  # type: ignore[arg-type]
    assert convert.to_json(None) == ""
    assert convert.to_json({"b": 1, "a": [1.5]}) == '{"a": [1.5], "b": 1}'
    assert json.loads(convert.to_json({"x": object()}))["x"].startswith("<object")  # anything else: its str


def test_workflow_record_to_proto() -> None:
    msg = convert.workflow(record())
    assert (msg.workflow_id, msg.request, msg.request_id, msg.planner) == ("wf-1", "calm piano", "rid-1", "rules")
    assert msg.state == pb.Workflow.STATE_SUCCEEDED and msg.fallback_reason == "no JSON in the answer"
    assert json.loads(msg.plan_json) == PLAN
    assert [(s.step_id, s.step_type, s.state, s.error) for s in msg.steps] == [
        ("gen", "generate", "SUCCEEDED", ""), ("ana", "analyze", "FAILED", "model not ready")]
    assert json.loads(msg.steps[0].summary_json) == {"audio": {"shape": [200]}} and msg.steps[1].summary_json == ""
    assert list(msg.pattern_ids) == ["p-1", "p-2"] and msg.audio_seconds == 2.5
    assert (msg.thinking, msg.answer) == ("hmm", "{}")
    assert msg.create_time.ToMicroseconds() == 1_700_000_000_123_456
    assert msg.update_time.ToMicroseconds() == 1_700_000_001_000_000


def test_a_fresh_workflow_record_has_empty_optional_fields() -> None:
    msg = convert.workflow(record(state=WorkflowState.RUNNING, steps=[], summary=None, fallback_reason=None,
                                  error=None))
    assert msg.state == pb.Workflow.STATE_RUNNING and msg.fallback_reason == "" and msg.error == ""
    assert list(msg.pattern_ids) == [] and msg.audio_seconds == 0.0


def test_cluster_to_proto() -> None:
    c = Cluster(index=0, label="calm piano", size=3, centroid=[0.1, 0.2], member_ids=["a", "b", "c"],
                top_tags={"mood": "calm"}, top_words=["calm", "piano"], cohesion=0.875, mean_rating=None,
                rating_count=0)
    msg = convert.cluster(c)
    assert (msg.label, msg.size, list(msg.pattern_ids), dict(msg.top_tags)) == (
        "calm piano", 3, ["a", "b", "c"], {"mood": "calm"})
    assert list(msg.top_words) == ["calm", "piano"] and msg.cohesion == 0.875 and msg.mean_rating == 0.0


# --- the servicer's pure helpers ------------------------------------------------------------------------------------
def test_scheduler_enum_maps_onto_the_one_list() -> None:
    values = set(pb.GenerateRequest.Scheduler.values())
    assert set(SCHEDULER_NAMES) == values, "every proto value has a name"
    assert sorted(set(SCHEDULER_NAMES.values())) == sorted(SCHEDULERS), "and every scheduler a proto value"
    assert SCHEDULER_NAMES[pb.GenerateRequest.SCHEDULER_UNSPECIFIED] == DEFAULT_SCHEDULER
    assert SCHEDULER_NAMES[pb.GenerateRequest.SCHEDULER_DPM_SOLVER] == "dpm"


def test_client_and_plan_schedulers_agree_with_the_server() -> None:
    from grym.client import DEFAULT_SCHEDULER as CLIENT_DEFAULT
    from grym.client import SCHEDULERS as CLIENT_SCHEDULERS

    assert CLIENT_DEFAULT == DEFAULT_SCHEDULER
    assert {name: SCHEDULER_NAMES[value] for name, value in CLIENT_SCHEDULERS.items()} == {n: n for n in SCHEDULERS}
    assert set(schema.SCHEDULERS) <= set(SCHEDULERS), "a plan may only name schedulers the model has"


def test_generate_request_to_params() -> None:
    req = pb.GenerateRequest(prompt="rain on a tin roof", duration_seconds=2.0, steps=4,
                             scheduler=pb.GenerateRequest.SCHEDULER_EULER)
    params = _generate_params(req, 30.0)
    assert (params.prompt, params.duration_s, params.steps, params.scheduler) == ("rain on a tin roof", 2.0, 4, "euler")
    assert params.seed is None and params.guidance_scale == 2.5, "unset optional fields take the defaults"
    req.seed, req.guidance_scale, req.scheduler = 0, 0.0, pb.GenerateRequest.SCHEDULER_UNSPECIFIED
    params = _generate_params(req, 30.0)
    assert params.seed == 0 and params.guidance_scale == 0.0 and params.scheduler == DEFAULT_SCHEDULER
    req.scheduler = 99
    with pytest.raises(InvalidArgument, match="unknown scheduler 99"):
        _generate_params(req, 30.0)
    with pytest.raises(InvalidArgument, match="duration_seconds"):
        _generate_params(pb.GenerateRequest(prompt="x", duration_seconds=31.0), 30.0)


def test_pcm_encodings() -> None:
    assert _encoding(common_pb2.PcmAudio.ENCODING_LINEAR16) == "linear16"
    assert _encoding(common_pb2.PcmAudio.ENCODING_FLOAT32) == "float32"
    assert _encoding(common_pb2.PcmAudio.ENCODING_UNSPECIFIED) == "float32"
    with pytest.raises(InvalidArgument, match="unknown PCM encoding 7"):
        _encoding(7)


def test_request_ids() -> None:
    assert len(_request_id("")) == 32, "none given: one is made"
    assert _request_id("rid-1") == "rid-1"
    for bad in ("a b", "x" * 129, "é", "tab\t"):
        with pytest.raises(InvalidArgument, match="request_id"):
            _request_id(bad)


def test_undecodable_requests_are_handed_on_not_raised() -> None:
    parse = _lenient(pb.GenerateRequest)
    assert parse(pb.GenerateRequest(prompt="x").SerializeToString()).prompt == "x"
    bad = parse(b"\xff\xff\xff")
    assert isinstance(bad, _Undecodable) and bad.message == "request is not a valid grym.v1.GenerateRequest message"


def test_status_error_keeps_a_known_code() -> None:
    assert _status_error("UNAVAILABLE", "down").code == grpc.StatusCode.UNAVAILABLE
    assert _status_error("NO_SUCH_CODE", "x").code == grpc.StatusCode.INTERNAL


async def test_audio_chunks_mark_the_last() -> None:
    chunks = await _audio_chunks(AudioData([b"a", b"b", b"c"], 16_000))
    assert [(c.wav_data, c.chunk_index, c.last, c.sample_rate_hz) for c in chunks] == [
        (b"a", 0, False, 16_000), (b"b", 1, False, 16_000), (b"c", 2, True, 16_000)]


def test_pattern_and_features_to_proto() -> None:
    p = PatternRecord(id="p-1", model="wav2vec2", profile="tiny", duration_s=1.5, tags={"mood": "calm"},
                      created_at_us=1_700_000_000_000_001, source="generate", metadata={"seed": "3"},
                      embedding=[0.5, 0.25])
    msg = OrchestratorService._pattern(p)
    assert (msg.pattern_id, list(msg.embedding), msg.model, msg.profile, msg.duration_seconds) == (
        "p-1", [0.5, 0.25], "wav2vec2", "tiny", 1.5)
    assert dict(msg.tags) == {"mood": "calm"} and dict(msg.metadata) == {"seed": "3"} and msg.source == "generate"
    assert msg.create_time.ToMicroseconds() == 1_700_000_000_000_001
    assert OrchestratorService._features(None) is None
    features = OrchestratorService._features(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert (features.rows, features.cols, list(features.values)) == (2, 3, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


def test_compose_events_to_messages() -> None:
    thinking = _compose_message(TokenEvent(text="hmm", kind="thinking", token_index=3), {})
    assert thinking is not None and thinking.token.kind == pb.CoordinatorToken.KIND_THINKING
    assert (thinking.token.text, thinking.token.index) == ("hmm", 3)
    assert _compose_message(TokenEvent(text="", kind="answer", token_index=4), {}) is None, "empty text: nothing"

    plan = validate_plan(PLAN, planner="rules")
    recalled = [PatternRecord(id="p-9", model="m", profile="tiny", duration_s=1.0, tags={}, created_at_us=0,
                              source="s")]
    chosen = _compose_message(PlanChosen(plan, recalled), {})
    assert chosen is not None and chosen.plan.planner == pb.ComposePlan.PLANNER_RULES
    assert json.loads(chosen.plan.plan_json) == plan.to_dict() and list(chosen.plan.recalled_pattern_ids) == ["p-9"]

    types = {"gen": "generate"}
    common = dict(workflow_id="wf", seq=1, at_us=0)
    states = [(StepStarted(step_id="gen", step_type="generate", **common), pb.ComposeStep.STATE_STARTED),
              (StepProgress(step_id="gen", done=2, total=4, message="", **common), pb.ComposeStep.STATE_PROGRESS),
              (StepFinished(step_id="gen", step_type="generate", summary={"rms": 0.5}, elapsed_s=1.0, **common),
               pb.ComposeStep.STATE_FINISHED),
              (StepFailed(step_id="gen", step_type="generate", code="UNAVAILABLE", error="down", **common),
               pb.ComposeStep.STATE_FAILED),
              (StepCancelled(step_id="gen", step_type="generate", reason="stopped", **common),
               pb.ComposeStep.STATE_CANCELLED)]
    for event, state in states:
        msg = _compose_message(event, types)
        assert msg is not None and msg.step.state == state and msg.step.step_type == "generate", event
    progress = _compose_message(states[1][0], types)
    assert progress is not None and (progress.step.done, progress.step.total) == (2, 4)
    finished_step = _compose_message(states[2][0], types)
    assert finished_step is not None and json.loads(finished_step.step.summary_json) == {"rms": 0.5}
    assert _compose_message(states[3][0], types).step.error == "down"  # type: ignore[union-attr]
    assert _compose_message(states[4][0], types).step.error == "stopped"  # type: ignore[union-attr]

    features = _compose_message(Features(step_id="ana", frames=24, embedding=[0.5], duration_s=0.5), {})
    assert features is not None and (features.features.step_id, features.features.frames) == ("ana", 24)
    finished = _compose_message(Finished(record()), {})
    assert finished is not None and finished.summary.workflow_id == "wf-1"
    assert _compose_message(object(), {}) is None
