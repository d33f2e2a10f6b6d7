"""Conversions between serving-layer records and grym.v1 protobuf messages (no logic, no I/O)."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from grym_synth.api.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.core.audio import TARGET_RATE_HZ
from grym_synth.core.errors import InvalidArgument
from grym_synth.generation.service import MODES, WAV_CHUNK_BYTES, AudioData
from grym_synth.memory.learning import Cluster
from grym_synth.workflow.store import WorkflowRecord, WorkflowState

WORKFLOW_STATES = {s: getattr(pb.Workflow, f"STATE_{s.value}") for s in WorkflowState}
STATE_FROM_PROTO = {v: k for k, v in WORKFLOW_STATES.items()}


def timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(int(us or 0))
    return ts


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if value is not None else ""


def workflow(record: WorkflowRecord) -> pb.Workflow:
    summary = record.summary or {}
    return pb.Workflow(
        workflow_id=record.id, request=record.request_text, request_id=record.request_id,
        state=WORKFLOW_STATES[WorkflowState(record.state)], planner=record.planner,
        fallback_reason=record.fallback_reason or "", plan_json=to_json(record.plan),
        steps=[pb.WorkflowStep(step_id=s.step_id, step_type=s.step_type, state=str(getattr(s.state, "value", s.state)),
                               summary_json=to_json(s.summary), error=s.error or "") for s in record.steps],
        error=record.error or "", pattern_ids=list(summary.get("patterns", [])),
        audio_seconds=float(summary.get("audio_s", 0.0)), thinking=record.transcript_thinking,
        answer=record.transcript_answer, create_time=timestamp(record.created_at_us),
        update_time=timestamp(record.updated_at_us),
    )


def cluster(c: Cluster) -> pb.PatternCluster:
    return pb.PatternCluster(label=c.label, size=c.size, pattern_ids=list(c.member_ids), top_tags=dict(c.top_tags),
                             top_words=list(c.top_words), cohesion=float(c.cohesion),
                             mean_rating=float(c.mean_rating or 0.0))


# GenerateRequest.Mode -> generation mode name (None: unspecified, decided by whether init audio is given).
GENERATE_MODES = {pb.GenerateRequest.MODE_UNSPECIFIED: None,
                  **{pb.GenerateRequest.Mode.Value(f"MODE_{name.upper()}"): name for name in MODES}}


def generate_mode(value: int) -> str | None:
    """The mode name of a GenerateRequest.mode value; INVALID_ARGUMENT for a value the API does not define."""
    if value not in GENERATE_MODES:
        raise InvalidArgument(f"unknown mode {value}; expected MODE_TEXT, MODE_VARY or MODE_CONTINUE")
    return GENERATE_MODES[value]


def stored_audio(wav: bytes, audio_format: int) -> AudioData:
    """A pattern's stored WAV (16-bit, 16 kHz) as AudioData for the AudioChunk builder: the stored bytes as they
    are for WAV (so their SHA-256 is the pattern's audio_sha256). Hook for the output-format encoder (issue 9):
    other formats are refused here until it is merged."""
    if audio_format not in (common_pb2.AUDIO_FORMAT_UNSPECIFIED, common_pb2.AUDIO_FORMAT_WAV_PCM16):
        known = audio_format in common_pb2.AudioFormat.values()
        name = common_pb2.AudioFormat.Name(audio_format) if known else str(audio_format)
        raise InvalidArgument(f"format {name} is not available yet; use AUDIO_FORMAT_WAV_PCM16")
    return AudioData([wav[i: i + WAV_CHUNK_BYTES] for i in range(0, len(wav), WAV_CHUNK_BYTES)], TARGET_RATE_HZ)
