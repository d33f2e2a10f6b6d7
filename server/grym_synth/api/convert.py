"""Conversions between serving-layer records and grym.v1 protobuf messages (no logic, no I/O)."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

import numpy as np

from grym_synth.analysis.music import Category, Detail, MusicDescription, Tag
from grym_synth.api.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.core.errors import InvalidArgument
from grym_synth.memory.music_index import MusicFields, MusicQuery
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


# --- music descriptions (analysis.music / memory.music_index <-> grym.v1.MusicDescription) ---------------------------
MUSIC_DETAILS = {common_pb2.MUSIC_DETAIL_UNSPECIFIED: Detail.SUMMARY, common_pb2.MUSIC_DETAIL_NONE: Detail.NONE,
                 common_pb2.MUSIC_DETAIL_SUMMARY: Detail.SUMMARY, common_pb2.MUSIC_DETAIL_FULL: Detail.FULL}


def music_detail(value: int, what: str = "music_detail") -> Detail:
    if value not in MUSIC_DETAILS:
        raise InvalidArgument(f"{what} {value} is not a MusicDetail value (NONE, SUMMARY or FULL)")
    return MUSIC_DETAILS[value]


def music(desc: MusicDescription | None) -> common_pb2.MusicDescription | None:
    if desc is None:
        return None
    return common_pb2.MusicDescription(
        tempo_bpm=desc.tempo_bpm, tempo_confidence=desc.tempo_confidence, beats_seconds=desc.beats_s, key=desc.key,
        key_confidence=desc.key_confidence,
        notes=[common_pb2.Note(pitch=n.pitch, start_seconds=n.start_s, end_seconds=n.end_s, velocity=n.velocity)
               for n in desc.notes],
        tags=[common_pb2.MusicTag(label=t.label, score=t.score, category=int(t.category)) for t in desc.tags],
        vocal_segments=[common_pb2.TimeSpan(start_seconds=a, end_seconds=b) for a, b in desc.vocal_segments],
        embedding=desc.embedding.tolist() if desc.embedding is not None else [], models=desc.models)


def stored_music(fields: MusicFields | None) -> common_pb2.MusicDescription | None:
    """A stored pattern's description (its embedding only when it was fetched)."""
    if fields is None:
        return None
    return common_pb2.MusicDescription(
        tempo_bpm=fields.tempo_bpm, tempo_confidence=fields.tempo_confidence, key=fields.key,
        key_confidence=fields.key_confidence,
        tags=[common_pb2.MusicTag(label=lb, score=sc, category=cat) for lb, sc, cat in fields.tags],
        vocal_segments=[common_pb2.TimeSpan(start_seconds=a, end_seconds=b) for a, b in fields.vocal_segments],
        embedding=fields.embedding or [], models=fields.models)


def description_of(fields: MusicFields, duration_s: float) -> MusicDescription:
    """A stored pattern's fields as a description (DescribeAudio of a pattern)."""
    return MusicDescription(
        tempo_bpm=fields.tempo_bpm, tempo_confidence=fields.tempo_confidence, key=fields.key,
        key_confidence=fields.key_confidence,
        tags=[Tag(lb, sc, Category(cat) if cat in Category._value2member_map_ else Category.OTHER)
              for lb, sc, cat in fields.tags],
        vocal_segments=list(fields.vocal_segments), models=fields.models, tag_scores=dict(fields.tag_scores),
        embedding=np.asarray(fields.embedding, dtype=np.float32) if fields.embedding else None,
        duration_s=duration_s)


def music_query(f: pb.MusicFilter | None) -> MusicQuery | None:
    """A validated MusicFilter (None when unset or empty)."""
    if f is None:
        return None
    q = MusicQuery.parse(f.min_tempo_bpm, f.max_tempo_bpm, f.key, list(f.tags))
    return q or None
