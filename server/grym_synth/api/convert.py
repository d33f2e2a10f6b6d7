"""Conversions between serving-layer records and grym.v1 protobuf messages (no logic, no I/O)."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import soundfile as sf
from google.protobuf.timestamp_pb2 import Timestamp

from grym_synth.analysis.music import Category, Detail, MusicDescription, Tag
from grym_synth.api.v1 import common_pb2, orchestrator_pb2 as pb
from grym_synth.core.audio import TARGET_RATE_HZ, AudioFormat, decode_file, decode_pcm, encode_audio, encoded_rate_hz
from grym_synth.core.errors import InvalidArgument
from grym_synth.generation.service import MODES, WAV_CHUNK_BYTES, AudioData
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
        update_time=timestamp(record.updated_at_us), music=music_record(record.music),
    )


def cluster(c: Cluster) -> pb.PatternCluster:
    return pb.PatternCluster(label=c.label, size=c.size, pattern_ids=list(c.member_ids), top_tags=dict(c.top_tags),
                             top_words=list(c.top_words), cohesion=float(c.cohesion),
                             mean_rating=float(c.mean_rating or 0.0))


# --- audio ---------------------------------------------------------------------------------------------------------
# Proto AudioFormat number -> the one Python enum (core.audio.AudioFormat mirrors the numbers; 0, unset, is WAV 16).
AUDIO_FORMATS = {common_pb2.AUDIO_FORMAT_UNSPECIFIED: AudioFormat.WAV_PCM16,
                 **{common_pb2.AudioFormat.Value(f"AUDIO_FORMAT_{f.name}"): f for f in AudioFormat}}
PCM_ENCODINGS = {common_pb2.PcmAudio.ENCODING_UNSPECIFIED: "float32", common_pb2.PcmAudio.ENCODING_FLOAT32: "float32",
                 common_pb2.PcmAudio.ENCODING_LINEAR16: "linear16"}


def pcm_encoding(value: int) -> str:
    """A PcmAudio.Encoding number as core.audio's encoding name."""
    try:
        return PCM_ENCODINGS[value]
    except KeyError:
        raise InvalidArgument(f"unknown PCM encoding {value}") from None


def audio_format(value: int, field: str = "output_format") -> AudioFormat:
    """A request's AudioFormat number as the core enum; an unknown number (proto3 enums are open) is refused."""
    try:
        return AUDIO_FORMATS[value]
    except KeyError:
        names = ", ".join(common_pb2.AudioFormat.Name(v) for v in AUDIO_FORMATS if v)
        raise InvalidArgument(f"{field} {value} is not a known AudioFormat; expected one of {names}") from None


def audio_input(audio: common_pb2.AudioInput, *, max_seconds: float, field: str = "audio") -> tuple[np.ndarray, int]:
    """The samples (mono, or frames x channels for PCM) and sample rate of an AudioInput, whatever its source.

    ``wav`` and ``file`` are read alike (any supported format, detected from the content); ``max_seconds`` bounds
    the decoding of compressed files, before their samples are materialised."""
    source = audio.WhichOneof("source")
    if source in ("wav", "file"):
        return decode_file(getattr(audio, source), max_seconds=max_seconds, what=f"{field}.{source}")
    if source == "pcm":
        pcm = audio.pcm
        if pcm.sample_rate_hz <= 0:
            raise InvalidArgument(f"{field}.pcm.sample_rate_hz is required (e.g. 16000)")
        return decode_pcm(pcm.data, pcm.sample_rate_hz, pcm.channels, pcm_encoding(pcm.encoding))
    raise InvalidArgument(f"{field} is required: set {field}.file (the bytes of an audio file) or {field}.pcm")


def audio_chunks(samples: np.ndarray, sample_rate_hz: int, fmt: AudioFormat,
                 chunk_bytes: int = WAV_CHUNK_BYTES) -> list[pb.AudioChunk]:
    """Encode samples once in ``fmt`` and split the file into AudioChunk messages (``wav_data`` keeps its old
    name; it carries the bytes of ``fmt``). Every RPC that returns audio builds its chunks here."""
    return _chunks(encode_audio(samples, sample_rate_hz, fmt), encoded_rate_hz(sample_rate_hz, fmt), fmt,
                   chunk_bytes)


def audio_data_chunks(audio: AudioData, fmt: AudioFormat) -> list[pb.AudioChunk]:
    """Chunks of a service's AudioData in ``fmt``: its WAV 16 chunks as they are, or its samples re-encoded (taken
    from the 16-bit WAV when the service did not keep the float samples, which it encoded losslessly)."""
    if fmt == AudioFormat.WAV_PCM16:
        last = len(audio.wav_chunks) - 1
        return [pb.AudioChunk(wav_data=chunk, chunk_index=i, last=i == last, sample_rate_hz=audio.sample_rate_hz,
                              format=int(fmt)) for i, chunk in enumerate(audio.wav_chunks)]
    samples = audio.samples
    if samples is None:
        samples, _ = sf.read(io.BytesIO(b"".join(audio.wav_chunks)), dtype="float32")
    return audio_chunks(samples, audio.sample_rate_hz, fmt)


def _chunks(data: bytes, sample_rate_hz: int, fmt: AudioFormat, chunk_bytes: int = WAV_CHUNK_BYTES
            ) -> list[pb.AudioChunk]:
    pieces = [data[i: i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    return [pb.AudioChunk(wav_data=piece, chunk_index=i, last=i == len(pieces) - 1, sample_rate_hz=sample_rate_hz,
                          format=int(fmt)) for i, piece in enumerate(pieces)]


# GenerateRequest.Mode -> generation mode name (None: unspecified, decided by whether init audio is given).
GENERATE_MODES = {pb.GenerateRequest.MODE_UNSPECIFIED: None,
                  **{pb.GenerateRequest.Mode.Value(f"MODE_{name.upper()}"): name for name in MODES}}


def generate_mode(value: int) -> str | None:
    """The mode name of a GenerateRequest.mode value; INVALID_ARGUMENT for a value the API does not define."""
    if value not in GENERATE_MODES:
        raise InvalidArgument(f"unknown mode {value}; expected MODE_TEXT, MODE_VARY or MODE_CONTINUE")
    return GENERATE_MODES[value]


def stored_audio(wav: bytes) -> AudioData:
    """A pattern's stored WAV (16-bit, 16 kHz) as AudioData for the AudioChunk builder: in WAV 16 its bytes go out as
    they are (so their SHA-256 is the pattern's audio_sha256); other formats are encoded from its samples."""
    return AudioData([wav[i: i + WAV_CHUNK_BYTES] for i in range(0, len(wav), WAV_CHUNK_BYTES)], TARGET_RATE_HZ)


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


def music_record(record: Mapping[str, Any] | None) -> common_pb2.MusicDescription | None:
    """A description as Compose keeps it (compose.service.music_record: MusicFields as a dict)."""
    if not record:
        return None
    known = {f.name for f in dataclasses.fields(MusicFields)}
    return stored_music(MusicFields(**{k: v for k, v in record.items() if k in known}))


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
