"""The CLI over the API of the open issues (audio formats in and out, music descriptions, DescribeAudio,
GetPatternAudio, text and music-filtered search, init audio for Generate, Compose length), through the installed
``grym`` against the real server. The server side of these RPCs and fields is built on other branches: on a server
without it these tests fail (UNIMPLEMENTED, or the CLI refusing WAV sent for an .mp3); they pass once it is merged.
The argument -> request mapping of the same flags is tested without a server in tests/unit/test_cli_parser.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from support import OrchestratorProcess, tone
from test_cli import EXIT_OK, grym_command, ok_json, run

# extension (and --format) -> what libsndfile reports for the written file
OUTPUTS = [("out.wav", [], "WAV", "PCM_16"), ("out24.wav", ["--format", "wav24"], "WAV", "PCM_24"),
           ("out.flac", [], "FLAC", None), ("out.ogg", [], "OGG", "OPUS"), ("out.opus", [], "OGG", "OPUS"),
           ("vorbis.ogg", ["--format", "vorbis"], "OGG", "VORBIS"), ("out.mp3", [], "MP3", None)]
INPUTS = [("in.wav", "WAV", "PCM_16"), ("in.flac", "FLAC", "PCM_16"), ("in.ogg", "OGG", "VORBIS"),
          ("in.opus", "OGG", "OPUS"), ("in.mp3", "MP3", "MPEG_LAYER_III")]


@pytest.fixture(scope="module")
def target(orchestrator: OrchestratorProcess) -> str:
    return orchestrator.target


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("new_api_audio")
    samples = tone(3.0, 48_000, 440.0, channels=2, seed=21)
    for name, fmt, subtype in INPUTS:
        sf.write(folder / name, samples, 48_000, format=fmt, subtype=subtype)
    return folder


@pytest.fixture(scope="module")
def generated_pattern(target: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A stored pattern with audio (Generate --store keeps its audio)."""
    out = tmp_path_factory.mktemp("gen") / "p.wav"
    doc = ok_json(run(target, "generate", "bright plucked strings", "--seconds", "1", "--steps", "2", "--seed", "4",
                      "--store", "--tag", "test=cli-new", "--out", str(out), "--json"))
    return doc["result"]["pattern_id"]


@pytest.mark.parametrize("name", [n for n, _, _ in INPUTS])
def test_analyze_every_input_format(target: str, audio_dir: Path, name: str) -> None:
    doc = ok_json(run(target, "analyze", str(audio_dir / name), "--json"))
    assert abs(doc["duration_seconds"] - 3.0) < 0.1 and len(doc["embedding"]) > 4


def test_analyze_full_music_detail_writes_midi(target: str, audio_dir: Path, tmp_path: Path) -> None:
    mid = tmp_path / "notes.mid"
    doc = ok_json(run(target, "analyze", str(audio_dir / "in.flac"), "--midi", str(mid), "--json"))
    assert doc["midi"] == {"path": str(mid), "notes": len(doc["music"]["notes"])}
    assert mid.read_bytes()[:4] == b"MThd"
    summary = ok_json(run(target, "analyze", str(audio_dir / "in.wav"), "--music-detail", "summary", "--json"))
    assert summary["music"]["notes"] == [] and summary["music"]["models"]
    none = ok_json(run(target, "analyze", str(audio_dir / "in.wav"), "--music-detail", "none", "--json"))
    assert none.get("music", {}).get("tags", []) == []  # MUSIC_DETAIL_NONE: no description at all


def test_describe_file_and_pattern(target: str, audio_dir: Path, generated_pattern: str) -> None:
    doc = ok_json(run(target, "describe", str(audio_dir / "in.mp3"), "--json"))
    assert doc["caption"] and doc["describer"]
    text = run(target, "describe", "--pattern", generated_pattern)
    assert text.returncode == EXIT_OK and text.stdout.strip()


@pytest.mark.parametrize("name, extra, fmt, subtype", OUTPUTS)
def test_generate_every_output_format(target: str, tmp_path: Path, name: str, extra: list[str], fmt: str,
                                      subtype: str | None) -> None:
    out = tmp_path / name
    doc = ok_json(run(target, "generate", "soft rain", "--seconds", "1", "--steps", "2", "--seed", "1", "--out",
                      str(out), *extra, "--json"))
    info = sf.info(str(out))
    assert info.format == fmt and (subtype is None or info.subtype == subtype)
    assert abs(info.duration - doc["result"]["duration_seconds"]) < 0.1


def test_pattern_audio(target: str, generated_pattern: str, tmp_path: Path) -> None:
    for name in ("p.flac", "p.wav", "p.mp3"):
        doc = ok_json(run(target, "patterns", "audio", generated_pattern, "--out", str(tmp_path / name), "--json"))
        assert doc["output"]["bytes"] == (tmp_path / name).stat().st_size > 0
        assert abs(sf.info(str(tmp_path / name)).duration - 1.0) < 0.15
    got = ok_json(run(target, "patterns", "get", generated_pattern, "--json"))
    assert got["has_audio"] and len(got["audio_sha256"]) == 64


def test_search_by_text_and_music_filter(target: str, generated_pattern: str) -> None:
    doc = ok_json(run(target, "search", "--text", "strings", "--tag", "test=cli-new", "--json"))
    assert isinstance(doc["matches"], list)
    wide = ok_json(run(target, "search", "--pattern-id", generated_pattern, "--space", "wav2vec2", "--min-tempo", "0",
                       "--max-tempo", "1000", "--json"))
    assert isinstance(wide["matches"], list)
    # A tempo range no piece has: no matches; a key that is not a key: the server refuses it (exit 1, its code).
    narrow = ok_json(run(target, "search", "--text", "strings", "--min-tempo", "299", "--max-tempo", "300", "--json"))
    assert narrow["matches"] == []
    bad = run(target, "search", "--text", "strings", "--key", "no such key")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "music_filter.key" in bad.stderr


def test_generate_from_init_audio_and_pattern(target: str, audio_dir: Path, generated_pattern: str,
                                              tmp_path: Path) -> None:
    vary = ok_json(run(target, "generate", "brighter", "--init", str(audio_dir / "in.flac"), "--mode", "vary",
                       "--strength", "0.5", "--seconds", "1", "--steps", "2", "--out", str(tmp_path / "v.wav"),
                       "--json"))
    assert vary["output"]["bytes"] > 0
    cont = ok_json(run(target, "generate", "and on", "--init-pattern", generated_pattern, "--mode", "continue",
                       "--seconds", "1", "--steps", "2", "--out", str(tmp_path / "c.flac"), "--json"))
    assert sf.info(str(tmp_path / "c.flac")).format == "FLAC" and cont["result"]["duration_seconds"] > 0


def test_compose_length_and_format(target: str, tmp_path: Path) -> None:
    out = tmp_path / "piece.flac"
    doc = ok_json(run(target, "compose", "a calm piano piece", "--seconds", "3", "--out", str(out), "--json",
                      "--max-tokens", "16", timeout=400))
    assert doc["summary"]["state"] == "STATE_SUCCEEDED"
    assert abs(sf.info(str(out)).duration - 3.0) < 0.3 and doc["output"]["format"] == "FLAC"


def test_stream_final_music_description(target: str, audio_dir: Path) -> None:
    result = subprocess.run([*grym_command(), "--target", target, "stream", "-", "--music-detail", "summary",
                             "--json"], input=(audio_dir / "in.ogg").read_bytes(), capture_output=True, timeout=180)
    assert result.returncode == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["final"]["music"]["models"]


def test_docs_cli_md_commands_run(orchestrator: OrchestratorProcess, tmp_path: Path) -> None:
    """Every `grym` command of the examples in docs/cli.md, run as written (files made real, the example ids replaced
    by real ones, the 90 s piece shortened) against the test server. TLS/token examples: test_cli.py."""
    import importlib.util
    import os
    import re

    from support import ROOT, wav_bytes

    spec = importlib.util.spec_from_file_location("docs_contract", ROOT / "tests" / "contract" / "test_docs.py")
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)  # type: ignore[union-attr]
    clip = tone(3.0, 44_100, 330.0, channels=2, seed=31)
    sf.write(tmp_path / "song.wav", clip, 44_100)
    sf.write(tmp_path / "song.flac", clip, 44_100, format="FLAC")
    sf.write(tmp_path / "concert.mp3", tone(14.0, 44_100, 220.0, seed=32), 44_100, format="MP3")
    (tmp_path / "take1.wav").write_bytes(wav_bytes(tone(4.0, 16_000, 262.0, seed=33), 16_000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRYM_")}
    env["GRYM_TARGET"] = orchestrator.target
    first = json.loads(subprocess.run([*grym_command(), "generate", "a bell", "--seconds", "1", "--steps", "2",
                                       "--store", "--out", str(tmp_path / "bell.wav"), "--json"], env=env,
                                      capture_output=True, timeout=600).stdout)
    ids = {"3f2c9a4e-0000-4000-8000-000000000000": first["result"]["pattern_id"], "9d1e0f5b2c3a4d5e": ""}
    ran = 0
    text = (ROOT / "docs" / "cli.md").read_text()
    for block in docs.FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for argv in docs.commands_in_line(line):
                if argv[0] != "grym" or any(a.startswith(("--tls", "--token", "--target")) for a in argv):
                    continue
                args = [ids.get(a) or a for a in argv[1:]]
                args = ["3" if a == "90" else a for a in args]
                stdin = (tmp_path / "take1.wav").read_bytes() if "-" in args else None
                result = subprocess.run([*grym_command(), *args], cwd=tmp_path, env=env, input=stdin,
                                        capture_output=True, timeout=600)
                assert result.returncode == 0, f"docs/cli.md: grym {' '.join(args)}\n{result.stderr.decode()}"
                out = result.stdout.decode()
                if args[0] == "generate" and "--store" in args:
                    ids["3f2c9a4e-0000-4000-8000-000000000000"] = json.loads(out)["pattern_id"]
                if args[0] == "compose":
                    ids["9d1e0f5b2c3a4d5e"] = re.search(r'"workflow_id": "([^"]+)"', out).group(1)
                ran += 1
    assert ran >= 15 and all(ids.values())


async def test_library_describe_and_pattern_audio(orchestrator: OrchestratorProcess, generated_pattern: str,
                                                  audio_dir: Path) -> None:
    from grym import AsyncClient, Client
    from grym.v1 import common_pb2

    with Client(orchestrator.target, timeout_s=120) as c:
        assert c.describe(str(audio_dir / "in.flac")).caption
        chunks = [m.audio for m in c.pattern_audio(generated_pattern, audio_format=common_pb2.AUDIO_FORMAT_FLAC)]
        assert chunks[-1].last and chunks[0].format == common_pb2.AUDIO_FORMAT_FLAC
        assert c.search(text="strings", top_k=3) is not None
    async with AsyncClient(orchestrator.target, timeout_s=120) as c:
        assert (await c.describe(pattern_id=generated_pattern)).caption
        chunks = [m.audio async for m in c.pattern_audio(generated_pattern)]
        assert chunks and chunks[-1].last
