"""The audio store on real filesystems (a local directory, ``file://`` and fsspec's ``memory://``) and the pattern
store's audio handling on a real milvus-lite: content addressing, dedup, atomic writes, verified reads, GC."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from grym_synth.core.errors import NotFound, Unavailable
from grym_synth.generation.service import InitSpec, validate_init
from grym_synth.core.errors import InvalidArgument
from grym_synth.memory.audio_store import AUDIO_SHA_KEY, AudioStore, DataLoss, canonical_wav, is_sha256
from grym_synth.memory.store import PatternStore

RATE = 16_000


def tone(seconds: float = 0.25, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(params=["path", "file", "memory"])
def store(request, tmp_path: Path) -> AudioStore:
    url = {"path": str(tmp_path / "audio"), "file": f"file://{tmp_path / 'audio'}",
           "memory": f"memory://grym-test-{uuid.uuid4().hex}"}[request.param]
    s = AudioStore(url)
    s.open()
    return s


def test_put_is_content_addressed_and_get_returns_the_canonical_wav(store: AudioStore) -> None:
    audio = tone()
    sha = asyncio.run(store.put(audio))
    data, expected = canonical_wav(audio)
    assert sha == expected == hashlib.sha256(data).hexdigest() and is_sha256(sha)
    got = asyncio.run(store.get(sha))
    assert got == data
    samples, rate = sf.read(io.BytesIO(got), dtype="float32")
    assert rate == RATE and np.max(np.abs(samples - audio)) < 1e-4  # 16-bit quantisation
    assert store.path(sha).endswith(f"/{sha[:2]}/{sha}.wav")


def test_identical_audio_is_stored_once(store: AudioStore) -> None:
    first, second = asyncio.run(store.put(tone())), asyncio.run(store.put(tone()))
    other = asyncio.run(store.put(tone(freq=330.0)))
    assert first == second != other
    files = [f for f in store.fs.find(store.root) if f.endswith(".wav")]
    assert len(files) == 2


def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    s = AudioStore(tmp_path / "audio")
    s.open()
    for i in range(5):
        asyncio.run(s.put(tone(freq=200.0 + i)))
    names = [p.name for p in (tmp_path / "audio").rglob("*") if p.is_file()]
    assert len(names) == 5 and all(n.endswith(".wav") and not n.startswith(".") for n in names)


def test_missing_and_corrupt_files_are_data_loss(store: AudioStore) -> None:
    sha = asyncio.run(store.put(tone()))
    store.fs.pipe_file(store.path(sha), b"RIFF-not-the-same-bytes")
    with pytest.raises(DataLoss) as corrupt:
        asyncio.run(store.get(sha, pattern_id="p-1"))
    assert corrupt.value.code == grpc.StatusCode.DATA_LOSS and "corrupt" in corrupt.value.message
    assert "p-1" in corrupt.value.message
    asyncio.run(store.delete(sha))
    with pytest.raises(DataLoss) as missing:
        asyncio.run(store.get(sha))
    assert "missing" in missing.value.message
    with pytest.raises(DataLoss, match="not a SHA-256"):
        asyncio.run(store.get("../../etc/passwd"))
    asyncio.run(store.delete("not-a-sha"))  # ignored, never a path outside the store


def test_a_corrupt_file_is_replaced_by_the_next_put(store: AudioStore) -> None:
    sha = asyncio.run(store.put(tone()))
    store.fs.pipe_file(store.path(sha), b"short")
    assert asyncio.run(store.put(tone())) == sha
    assert asyncio.run(store.get(sha)) == canonical_wav(tone())[0]


def test_an_unwritable_store_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    s = AudioStore(blocker / "audio")
    with pytest.raises(Unavailable) as err:
        asyncio.run(s.put(tone()))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "audio store" in err.value.message


# --- validate_init: the request rules -------------------------------------------------------------------------------
INIT_ID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


@pytest.mark.parametrize("mode,audio,pattern,strength,says", [
    ("text", tone(), "", None, "TEXT takes no init audio"),
    ("text", None, INIT_ID, None, "TEXT takes no init audio"),
    (None, tone(), INIT_ID, None, "exclusive"),
    ("vary", None, "", None, "needs init_audio or init_pattern_id"),
    ("continue", None, "", None, "needs init_audio or init_pattern_id"),
    ("vary", tone(), "", 1.5, "init_strength must be in [0, 1]"),
    ("vary", tone(), "", -0.1, "init_strength must be in [0, 1]"),
    ("vary", tone(), "", float("nan"), "init_strength must be a finite number"),
    ("vary", None, "'; drop", None, "init_pattern_id must be a pattern id"),
    ("remix", tone(), "", None, "unknown mode"),
])
def test_validate_init_refusals(mode, audio, pattern, strength, says) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_init(mode, audio, pattern, strength)
    assert says in err.value.message


def test_validate_init_defaults() -> None:
    assert validate_init(None, None, "", None) == InitSpec(mode="text")
    spec = validate_init(None, tone(), "", None, duration_given=False)
    assert spec.mode == "vary" and spec.strength == 0.6 and not spec.duration_given
    assert validate_init("continue", None, INIT_ID, 0.0).pattern_id == INIT_ID


# --- the pattern store's audio handling on milvus-lite ------------------------------------------------------------
DIM = 8


@pytest.fixture
def patterns(tmp_path: Path):
    audio = AudioStore(tmp_path / "audio")
    audio.open()
    s = PatternStore(str(tmp_path / "milvus" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny",
                     audio_store=audio)
    s.open()
    yield s
    s.close()
    # Stop this store's milvus-lite server now, not at interpreter exit (where it logs to closed streams).
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(s.uri)


def vec(i: int) -> list[float]:
    v = [0.1] * DIM
    v[i % DIM] = 1.0
    return v


def test_patterns_reference_their_audio_and_gc_removes_the_last_reference(patterns: PatternStore) -> None:
    async def run() -> None:
        a = await patterns.insert(vec(0), duration_s=0.25, tags={}, source="t", audio=tone(),
                                  metadata={AUDIO_SHA_KEY: "f" * 64})  # a caller cannot set the reserved key
        b = await patterns.insert(vec(1), duration_s=0.25, tags={}, source="t", audio=tone())
        sha = canonical_wav(tone())[1]
        assert a.audio_sha256 == b.audio_sha256 == sha
        assert (await patterns.get(a.id)).metadata[AUDIO_SHA_KEY] == sha
        record, wav = await patterns.audio(a.id)
        assert record.id == a.id and hashlib.sha256(wav).hexdigest() == sha
        await patterns.delete(a.id)
        assert await patterns.audio_store.exists(sha), "b still references the audio"
        await patterns.delete(b.id)
        assert not await patterns.audio_store.exists(sha), "the last reference is gone: so is the file"
        bare = await patterns.insert(vec(2), duration_s=0.25, tags={}, source="t")
        with pytest.raises(NotFound, match="has no stored audio"):
            await patterns.audio(bare.id)
        lost = await patterns.insert(vec(3), duration_s=0.25, tags={}, source="t", audio=tone(freq=550.0))
        os.remove(patterns.audio_store.path(lost.audio_sha256))
        with pytest.raises(DataLoss, match="missing"):
            await patterns.audio(lost.id)

    asyncio.run(run())


def test_a_failed_insert_leaves_no_audio_file(patterns: PatternStore) -> None:
    async def run() -> None:
        with pytest.raises(InvalidArgument):  # metadata too large: refused by the insert after the file was written
            await patterns.insert(vec(0), duration_s=0.25, tags={}, source="t", audio=tone(freq=660.0),
                                  metadata={"x": "y" * 20_000})
        assert not await patterns.audio_store.exists(canonical_wav(tone(freq=660.0))[1])

    asyncio.run(run())
