"""The CLI's argument -> request mapping, output-format choice, MIDI writer and error shape, without a server: the
client is a recorder that keeps each request and answers with a canned response (pure logic; the real server is
exercised in tests/integration/test_cli.py and test_cli_new_api.py)."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf

from grym import cli
from grym.client import (FORMATS, AsyncClient, Client, GrymError, channel_credentials, output_format, read_token,
                         same_format)
from grym.midi import TICKS_PER_SECOND, midi_bytes
from grym.v1 import common_pb2, orchestrator_pb2 as pb

A = common_pb2.AudioFormat


class Recorder:
    """Stands in for :class:`grym.Client`: records (method, request), answers from ``replies``."""

    def __init__(self, replies: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.replies = replies or {}

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        self.calls.append((method, request))
        reply = self.replies.get(method)
        if isinstance(reply, Exception):
            raise reply
        return reply if reply is not None else getattr(pb, method + "Response")()

    def stream(self, method: str, request: Any, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        self.calls.append((method, request if not inspect.isgenerator(request) else list(request)))
        yield from self.replies.get(method, [])

    def health(self, service: str = "") -> str:
        return self.replies.get("health", "SERVING")

    def list_patterns(self, **kw: Any):  # type: ignore[no-untyped-def]
        self.calls.append(("ListPatterns", kw))
        yield from []

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
            recorder: Recorder | None = None) -> tuple[int, str, str, Recorder]:
    rec = recorder or Recorder()
    monkeypatch.setattr(cli, "connect", lambda args: rec)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err, rec


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "in.wav"
    sf.write(path, (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    return path


def _audio_events(fmt: int, data: bytes = b"ABCD") -> list[Any]:
    return [pb.GenerateResponse(request_id="r", progress=pb.GenerateProgress(step=1, total_steps=1)),
            pb.GenerateResponse(request_id="r", audio=pb.AudioChunk(wav_data=data[:2], chunk_index=0, format=fmt,
                                                                     sample_rate_hz=16000)),
            pb.GenerateResponse(request_id="r", audio=pb.AudioChunk(wav_data=data[2:], chunk_index=1, last=True,
                                                                     format=fmt, sample_rate_hz=16000)),
            pb.GenerateResponse(request_id="r", result=pb.GenerateResult(seed=3, sample_rate_hz=16000))]


# --- output formats ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fmt, expected", [
    ("a.wav", None, A.AUDIO_FORMAT_WAV_PCM16), ("a.WAV", "wav24", A.AUDIO_FORMAT_WAV_PCM24),
    ("a.flac", None, A.AUDIO_FORMAT_FLAC), ("a.ogg", None, A.AUDIO_FORMAT_OGG_OPUS),
    ("a.opus", None, A.AUDIO_FORMAT_OGG_OPUS), ("a.ogg", "vorbis", A.AUDIO_FORMAT_OGG_VORBIS),
    ("a.mp3", None, A.AUDIO_FORMAT_MP3)])
def test_output_format_by_extension(name: str, fmt: str | None, expected: int) -> None:
    assert output_format(name, fmt) == expected


@pytest.mark.parametrize("name, fmt", [("a.xyz", None), ("noext", None), ("a.wav", "mp3"), ("a.mp3", "flac"),
                                       ("a.wav", "bogus")])
def test_output_format_refuses(name: str, fmt: str | None) -> None:
    with pytest.raises(ValueError):
        output_format(name, fmt)


def test_same_format_treats_unset_as_wav16() -> None:
    assert same_format(A.AUDIO_FORMAT_WAV_PCM16, A.AUDIO_FORMAT_UNSPECIFIED)
    assert not same_format(A.AUDIO_FORMAT_MP3, A.AUDIO_FORMAT_UNSPECIFIED)
    assert set(FORMATS.values()) == {v for v in A.values() if v != A.AUDIO_FORMAT_UNSPECIFIED}


@pytest.mark.parametrize("out, extra, fmt", [("x.mp3", [], A.AUDIO_FORMAT_MP3), ("x.wav", ["--format", "wav24"],
                                             A.AUDIO_FORMAT_WAV_PCM24), ("x.ogg", [], A.AUDIO_FORMAT_OGG_OPUS)])
def test_generate_sends_the_output_format_and_writes_it(monkeypatch, capsys, tmp_path, out, extra, fmt) -> None:
    rec = Recorder({"Generate": _audio_events(fmt)})
    path = tmp_path / out
    code, stdout, _, _ = run_cli(monkeypatch, capsys, ["generate", "p", "--out", str(path), *extra, "--json"], rec)
    assert code == 0
    assert rec.calls[0][1].output_format == fmt
    assert path.read_bytes() == b"ABCD"
    doc = json.loads(stdout)
    assert doc["output"]["format"] == A.Name(fmt).removeprefix("AUDIO_FORMAT_") and doc["result"]["seed"] == "3"


def test_audio_in_another_format_than_asked_is_not_written(monkeypatch, capsys, tmp_path) -> None:
    """A server that ignores output_format answers WAV: writing it to out.mp3 would be the old silent bug."""
    rec = Recorder({"Generate": _audio_events(A.AUDIO_FORMAT_UNSPECIFIED)})
    code, _, err, _ = run_cli(monkeypatch, capsys, ["generate", "p", "--out", str(tmp_path / "x.mp3")], rec)
    assert code == cli.EXIT_SERVER and "WAV_PCM16" in err and "MP3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.mp3").exists()


def test_unknown_extension_is_a_usage_error_before_any_call(monkeypatch, capsys, tmp_path) -> None:
    for argv in (["generate", "p", "--out", str(tmp_path / "x.aac")], ["compose", "r", "--out", "y.txt"],
                 ["patterns", "audio", "id", "--out", "z"]):
        code, _, err, rec = run_cli(monkeypatch, capsys, argv)
        assert code == cli.EXIT_USAGE and not rec.calls and err.startswith("grym: error:"), argv


def test_missing_output_folder_is_a_usage_error(monkeypatch, capsys, tmp_path) -> None:
    code, _, err, rec = run_cli(monkeypatch, capsys, ["generate", "p", "--out", str(tmp_path / "no" / "x.wav")])
    assert code == cli.EXIT_USAGE and "no folder" in err and not rec.calls


# --- the new API's flags -> requests ----------------------------------------------------------------------------------
def test_analyze_music_detail_and_midi(monkeypatch, capsys, tmp_path, wav) -> None:
    notes = [common_pb2.Note(pitch=60, start_seconds=0.0, end_seconds=0.5, velocity=90),
             common_pb2.Note(pitch=64, start_seconds=0.5, end_seconds=1.0, velocity=80)]
    reply = pb.AnalyzeAudioResponse(request_id="r", frames=3, embedding=[0.5] * 8,
                                     music=common_pb2.MusicDescription(tempo_bpm=120, key="C major", notes=notes))
    rec = Recorder({"AnalyzeAudio": reply})
    mid = tmp_path / "out.mid"
    code, out, _, _ = run_cli(monkeypatch, capsys, ["analyze", str(wav), "--midi", str(mid), "--json"], rec)
    assert code == 0
    req = rec.calls[0][1]
    assert req.music_detail == common_pb2.MUSIC_DETAIL_FULL and req.audio.wav == wav.read_bytes()
    doc = json.loads(out)
    assert doc["midi"] == {"path": str(mid), "notes": 2} and len(doc["embedding"]) == 8
    assert doc["music"]["notes"][1]["pitch"] == 64 and doc["music"]["key"] == "C major"
    assert read_midi_notes(mid.read_bytes()) == [(60, 0, 480, 90), (64, 480, 960, 80)]
    code, _, _, rec = run_cli(monkeypatch, capsys, ["analyze", str(wav), "--music-detail", "none"], Recorder())
    assert code == 0 and rec.calls[0][1].music_detail == common_pb2.MUSIC_DETAIL_NONE
    code, _, err, rec = run_cli(monkeypatch, capsys, ["analyze", str(wav), "--midi", "x.mid", "--music-detail",
                                                      "summary"])
    assert code == cli.EXIT_USAGE and "--music-detail full" in err and not rec.calls


def test_analyze_text_mode_summarises_music(monkeypatch, capsys, wav) -> None:
    reply = pb.AnalyzeAudioResponse(frames=3, embedding=[0.1] * 8, music=common_pb2.MusicDescription(
        tempo_bpm=97.26, key="A minor", tags=[common_pb2.MusicTag(label=x, score=0.5) for x in "abcdefg"]))
    code, out, _, _ = run_cli(monkeypatch, capsys, ["analyze", str(wav)], Recorder({"AnalyzeAudio": reply}))
    doc = json.loads(out)
    assert code == 0 and doc["music"] == {"tempo_bpm": 97.3, "key": "A minor", "tags": list("abcde"), "notes": 0,
                                          "vocal_segments": 0}


def test_search_flags(monkeypatch, capsys) -> None:
    code, _, _, rec = run_cli(monkeypatch, capsys, [
        "search", "--text", "dark guitar", "--space", "music", "--min-tempo", "90", "--max-tempo", "120",
        "--key", "A minor", "--music-tag", "guitar", "--music-tag", "drums", "--tag", "k=v", "--top-k", "7",
        "--include-embedding", "--json"])
    req = rec.calls[0][1]
    assert code == 0 and rec.calls[0][0] == "SearchPatterns"
    assert req.text == "dark guitar" and req.WhichOneof("query") == "text" and req.top_k == 7
    assert req.space == pb.SearchPatternsRequest.SPACE_MUSIC and req.include_embedding
    assert (req.music_filter.min_tempo_bpm, req.music_filter.max_tempo_bpm, req.music_filter.key,
            list(req.music_filter.tags)) == (90, 120, "A minor", ["guitar", "drums"])
    assert dict(req.tag_filter) == {"k": "v"}
    code, _, _, rec = run_cli(monkeypatch, capsys, ["search", "--pattern-id", "p1"])
    assert not rec.calls[0][1].HasField("music_filter") and rec.calls[0][1].pattern_id == "p1"


def test_search_like_analyses_first(monkeypatch, capsys, wav) -> None:
    rec = Recorder({"AnalyzeAudio": pb.AnalyzeAudioResponse(embedding=[1.0, 2.0])})
    code, _, _, _ = run_cli(monkeypatch, capsys, ["search", "--like", str(wav)], rec)
    assert code == 0 and [m for m, _ in rec.calls] == ["AnalyzeAudio", "SearchPatterns"]
    assert list(rec.calls[1][1].embedding.values) == [1.0, 2.0]


def test_generate_init_flags(monkeypatch, capsys, tmp_path, wav) -> None:
    rec = Recorder({"Generate": _audio_events(A.AUDIO_FORMAT_FLAC)})
    argv = ["generate", "p", "--init", str(wav), "--mode", "continue", "--strength", "0.3", "--seconds", "2",
            "--steps", "4", "--guidance", "3", "--seed", "9", "--scheduler", "dpm", "--negative", "n", "--store",
            "--tag", "a=b", "--out", str(tmp_path / "o.flac")]
    code, _, _, _ = run_cli(monkeypatch, capsys, argv, rec)
    req = rec.calls[0][1]
    assert code == 0 and req.mode == pb.GenerateRequest.MODE_CONTINUE and req.init_audio.wav == wav.read_bytes()
    assert abs(req.init_strength - 0.3) < 1e-6 and req.duration_seconds == 2 and req.steps == 4 and req.seed == 9
    assert req.guidance_scale == 3 and req.negative_prompt == "n" and req.store and dict(req.tags) == {"a": "b"}
    assert req.scheduler == pb.GenerateRequest.SCHEDULER_DPM_SOLVER and req.output_format == A.AUDIO_FORMAT_FLAC
    rec = Recorder({"Generate": _audio_events(A.AUDIO_FORMAT_WAV_PCM16)})
    code, _, _, _ = run_cli(monkeypatch, capsys, ["generate", "p", "--init-pattern", "pid", "--mode", "vary",
                                                  "--out", str(tmp_path / "o.wav")], rec)
    req = rec.calls[0][1]
    assert code == 0 and req.init_pattern_id == "pid" and not req.HasField("init_audio")
    assert req.mode == pb.GenerateRequest.MODE_VARY and not req.HasField("init_strength")
    code, _, err, _ = run_cli(monkeypatch, capsys, ["generate", "p", "--init", "a.wav", "--init-pattern", "x"])
    assert code == cli.EXIT_USAGE and "not allowed with" in err


def test_compose_flags_and_document(monkeypatch, capsys, tmp_path) -> None:
    events = [
        pb.ComposeResponse(request_id="r", workflow_id="w", plan=pb.ComposePlan(plan_json="{}")),
        pb.ComposeResponse(workflow_id="w", step=pb.ComposeStep(step_id="g", state=pb.ComposeStep.STATE_PROGRESS)),
        pb.ComposeResponse(workflow_id="w", step=pb.ComposeStep(step_id="g", state=pb.ComposeStep.STATE_FINISHED)),
        pb.ComposeResponse(workflow_id="w", section_audio=pb.ComposeSectionAudio(name="intro", data=b"xyz")),
        pb.ComposeResponse(workflow_id="w", progress=pb.ComposeProgress(done=1, total=2)),
        pb.ComposeResponse(workflow_id="w", audio=pb.AudioChunk(wav_data=b"OPUS", format=A.AUDIO_FORMAT_OGG_OPUS)),
        pb.ComposeResponse(workflow_id="w", summary=pb.Workflow(workflow_id="w", state=pb.Workflow.STATE_SUCCEEDED)),
    ]
    rec = Recorder({"Compose": events})
    out = tmp_path / "piece.opus"
    code, stdout, _, _ = run_cli(monkeypatch, capsys, ["compose", "req", "--seconds", "42", "--out", str(out),
                                                       "--json", "--max-tokens", "8", "--seed", "2"], rec)
    req = rec.calls[0][1]
    assert code == 0 and req.duration_seconds == 42 and req.output_format == A.AUDIO_FORMAT_OGG_OPUS
    assert req.max_tokens == 8 and req.seed == 2 and out.read_bytes() == b"OPUS"
    doc = json.loads(stdout)
    assert doc["sections"] == [{**doc["sections"][0], "name": "intro", "bytes": 3}] and "data" not in doc["sections"][0]
    assert len(doc["steps"]) == 1 and doc["summary"]["state"] == "STATE_SUCCEEDED"
    failed = events[:-2] + [pb.ComposeResponse(summary=pb.Workflow(workflow_id="w", state=pb.Workflow.STATE_FAILED,
                                                                   error="step g\nbroke"))]
    code, _, err, _ = run_cli(monkeypatch, capsys, ["compose", "req", "--out", str(tmp_path / "p.wav")],
                              Recorder({"Compose": failed}))
    assert code == cli.EXIT_SERVER and err.strip() == "grym: error: workflow w FAILED: step g broke"


def test_describe_and_pattern_audio(monkeypatch, capsys, tmp_path, wav) -> None:
    rec = Recorder({"DescribeAudio": pb.DescribeAudioResponse(caption="A minor, 110 BPM")})
    code, out, _, _ = run_cli(monkeypatch, capsys, ["describe", str(wav)], rec)
    assert code == 0 and out.strip() == "A minor, 110 BPM" and rec.calls[0][1].audio.wav == wav.read_bytes()
    code, out, _, rec = run_cli(monkeypatch, capsys, ["describe", "--pattern", "pid", "--json"], rec)
    assert rec.calls[-1][1].pattern_id == "pid" and json.loads(out)["caption"] == "A minor, 110 BPM"
    code, _, err, _ = run_cli(monkeypatch, capsys, ["describe"])
    assert code == cli.EXIT_USAGE
    chunks = [pb.GetPatternAudioResponse(request_id="r", audio=pb.AudioChunk(wav_data=b"fLaC", format=A.AUDIO_FORMAT_FLAC))]
    rec = Recorder({"GetPatternAudio": chunks})
    code, out, _, _ = run_cli(monkeypatch, capsys, ["patterns", "audio", "pid", "--out", str(tmp_path / "p.flac"),
                                                    "--json"], rec)
    assert code == 0 and rec.calls[0][1].format == A.AUDIO_FORMAT_FLAC and rec.calls[0][1].pattern_id == "pid"
    assert (tmp_path / "p.flac").read_bytes() == b"fLaC" and json.loads(out)["output"]["bytes"] == 4
    code, _, err, _ = run_cli(monkeypatch, capsys, ["patterns", "audio", "pid", "--out", str(tmp_path / "q.wav")],
                              Recorder({"GetPatternAudio": []}))
    assert code == cli.EXIT_SERVER and "without audio" in err


def test_stream_sends_decoded_pcm(monkeypatch, capsys, tmp_path) -> None:
    audio = np.stack([np.linspace(-0.5, 0.5, 8000), np.zeros(8000)], axis=1).astype(np.float32)
    path = tmp_path / "s.flac"
    sf.write(path, audio, 8000, format="FLAC", subtype="PCM_24")
    replies = [pb.StreamAnalyzeResponse(window_index=0, end_seconds=1.0, frames=49),
               pb.StreamAnalyzeResponse(is_final=True, window_index=1, end_seconds=1.0, frames=49, pattern_id="p")]
    code, out, _, rec = run_cli(monkeypatch, capsys, ["stream", str(path), "--store", "--music-detail", "full"],
                                Recorder({"StreamAnalyze": replies}))
    msgs = rec.calls[0][1]
    assert code == 0 and msgs[0].config.sample_rate_hz == 8000 and msgs[0].config.channels == 2
    assert msgs[0].config.store and msgs[0].config.music_detail == common_pb2.MUSIC_DETAIL_FULL
    sent = np.frombuffer(b"".join(m.audio_content for m in msgs[1:]), dtype="<f4").reshape(-1, 2)
    np.testing.assert_allclose(sent, audio, atol=1e-6)
    assert out.splitlines() == ["window 0: 0.00-1.00 s, 49 frames", "final: 1 windows, 1.00 s, 49 frames, pattern p"]


# --- errors -------------------------------------------------------------------------------------------------------------
def test_server_error_is_one_line_with_the_code(monkeypatch, capsys) -> None:
    rec = Recorder({"GetPattern": GrymError(grpc.StatusCode.NOT_FOUND, "pattern x\nnot found")})
    code, out, err, _ = run_cli(monkeypatch, capsys, ["patterns", "get", "x"], rec)
    assert code == cli.EXIT_SERVER and out == "" and err == "grym: error: NOT_FOUND: pattern x not found\n"


def test_health_not_serving_exits_1(monkeypatch, capsys) -> None:
    code, out, err, _ = run_cli(monkeypatch, capsys, ["health", "--json"], Recorder({"health": "NOT_SERVING"}))
    assert code == cli.EXIT_SERVER and json.loads(out)["status"] == "NOT_SERVING" and "NOT_SERVING" in err


def test_usage_errors_are_one_line(capsys) -> None:
    assert cli.main(["analyze", "--bogus"]) == cli.EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("grym ")


def test_options_after_the_command_win() -> None:
    args = cli.build_parser().parse_args(["--target", "a:1", "health", "--target", "b:2", "--json"])
    assert args.target == "b:2" and args.json
    args = cli.build_parser().parse_args(["--target", "a:1", "--json", "health"])
    assert args.target == "a:1" and args.json


def test_token_and_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRYM_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("GRYM_TOKEN", " env-token ")
    assert read_token(None) == "env-token"
    (tmp_path / "t").write_text("file-token\nignored\n")
    assert read_token(tmp_path / "t") == "file-token"
    (tmp_path / "empty").write_text("")
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError):
            read_token(bad)
    with pytest.raises(ValueError, match="--tls-key"):
        channel_credentials(cert=tmp_path / "t")
    with pytest.raises(ValueError, match="cannot read TLS CA"):
        channel_credentials(ca=tmp_path / "missing.pem")
    assert channel_credentials() is not None  # system roots


def test_progress_only_on_a_terminal(capsys) -> None:
    cli.Progress(enabled=False).show(1, 2)
    assert capsys.readouterr().err == ""
    bar = cli.Progress(enabled=True)
    bar.show(1, 2)
    bar.done()
    assert capsys.readouterr().err.startswith("\r[")


def test_async_client_has_every_sync_method() -> None:
    def public(cls: type) -> set[str]:
        return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}

    assert public(Client) == public(AsyncClient)
    for name in public(Client):
        sync, async_ = inspect.signature(getattr(Client, name)), inspect.signature(getattr(AsyncClient, name))
        assert list(sync.parameters) == list(async_.parameters), name


def test_completion_knows_every_command() -> None:
    script = cli.completion_script("bash")
    for name in [*cli.COMMANDS, "completion"]:
        assert name in script
    assert "--music-detail" in script and "complete -F _grym_complete grym" in script


# --- MIDI -----------------------------------------------------------------------------------------------------------------
def read_midi_notes(data: bytes) -> list[tuple[int, int, int, int]]:
    """(pitch, start tick, end tick, velocity) from a format-0 file: an independent reader for the writer's test."""
    assert data[:4] == b"MThd"
    fmt, ntracks, division = struct.unpack(">HHH", data[8:14])
    assert (fmt, ntracks, division) == (0, 1, 480) and data[14:18] == b"MTrk"
    length = struct.unpack(">I", data[18:22])[0]
    track, i, now, running, notes, open_notes = data[22:22 + length], 0, 0, 0, [], {}
    while i < len(track):
        delta = 0
        while True:
            b = track[i]
            i += 1
            delta = (delta << 7) | (b & 0x7F)
            if not b & 0x80:
                break
        now += delta
        status = track[i]
        if status == 0xFF:
            meta_len = track[i + 2]
            i += 3 + meta_len
            continue
        pitch, vel = track[i + 1], track[i + 2]
        i += 3
        if status & 0xF0 == 0x90 and vel:
            open_notes[pitch] = (now, vel)
        else:
            start, v = open_notes.pop(pitch)
            notes.append((pitch, start, now, v))
    return sorted(notes, key=lambda n: n[1])


def test_midi_round_trip_and_edge_cases() -> None:
    notes = [common_pb2.Note(pitch=200, start_seconds=1.0, end_seconds=1.0, velocity=0),  # clamped, min length
             common_pb2.Note(pitch=60, start_seconds=0.0, end_seconds=1.0, velocity=64),
             common_pb2.Note(pitch=60, start_seconds=1.0, end_seconds=2.5, velocity=70)]  # re-strike at 1.0 s
    got = read_midi_notes(midi_bytes(notes))
    second = TICKS_PER_SECOND
    assert sorted(got) == sorted([(60, 0, second, 64), (127, second, second + 1, 1), (60, second, int(2.5 * second), 70)])
    assert read_midi_notes(midi_bytes([])) == []
    long_note = common_pb2.Note(pitch=1, start_seconds=0, end_seconds=300, velocity=1)  # multi-byte delta
    assert read_midi_notes(midi_bytes([long_note])) == [(1, 0, 300 * TICKS_PER_SECOND, 1)]


def test_compose_narrative_on_a_terminal(capsys) -> None:
    progress, state = cli.Progress(enabled=True), {"quiet": False}
    events = [pb.ComposeResponse(token=pb.CoordinatorToken(kind=pb.CoordinatorToken.KIND_THINKING, text="hmm")),
              pb.ComposeResponse(token=pb.CoordinatorToken(kind=pb.CoordinatorToken.KIND_ANSWER, text="{}")),
              pb.ComposeResponse(plan=pb.ComposePlan(planner=pb.ComposePlan.PLANNER_RULES, fallback_reason="no JSON",
                                                     plan_json='{"steps": []}')),
              pb.ComposeResponse(step=pb.ComposeStep(step_id="g1", state=pb.ComposeStep.STATE_PROGRESS, done=1,
                                                     total=4)),
              pb.ComposeResponse(step=pb.ComposeStep(step_id="g1", step_type="generate",
                                                     state=pb.ComposeStep.STATE_FAILED, error="boom")),
              pb.ComposeResponse(progress=pb.ComposeProgress(done=2, total=4))]
    for event in events:
        cli._compose_narrative(event, progress, state)
    progress.done()
    err = capsys.readouterr().err
    for needle in ("--- coordinator thinking ---", "hmm", "--- coordinator answer ---", "plan by rules (no JSON)",
                   "g1 (generate) failed boom", "piece 2/4"):
        assert needle in err, needle
    for event in events:  # and nothing at all when stderr is not a terminal
        cli._compose_narrative(event, cli.Progress(enabled=False), {"quiet": False})
    assert capsys.readouterr().err == ""
