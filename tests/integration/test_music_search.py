"""Pattern memory by meaning through the public API: renders of self-made MIDI stored with their descriptors, found
again by music filter (tempo range, key, tags), by text and in the music space; hostile filter and text values get
INVALID_ARGUMENT or a correct (possibly empty) result, never INTERNAL."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from grym import Client
from grym.v1 import common_pb2, orchestrator_pb2 as pb

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NASTY = ["", " ", "\x00", "a\x00b", '"', "'", "\\", 'x"] or not id in ["', "' OR '1'='1", "{v}", "café",
         "🎹", "\u202e", "\t\n\r", "x" * 300, "é" * 5000, "G minor\" or key != \"", "A minor"]
STORED = (1, 7, 12, 13, 17)  # G minor 134 guitar, C# minor 99 guitar, C major 110 piano, G minor 64 guitar,
#                               B minor 121 harpsichord


@pytest.fixture(scope="module")
def library(client: Client, music_renders: dict) -> dict:
    """The renders stored as patterns under a suite tag of their own: index -> (pattern id, truth)."""
    suite = uuid.uuid4().hex
    out = {}
    for i in STORED:
        res = client.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(
            audio=common_pb2.AudioInput(wav=Path(music_renders[i]["wav"]).read_bytes()), store=True,
            tags={"suite": suite}), timeout=120)
        out[i] = (res.pattern_id, music_renders[i])
    return {"suite": suite, "patterns": out}


def _ids(library: dict, *indices: int) -> set[str]:
    return {library["patterns"][i][0] for i in indices}


def _list(client: Client, library: dict, **filt) -> set[str]:  # type: ignore[no-untyped-def]
    res = client.stub.ListPatterns(pb.ListPatternsRequest(
        tag_filter={"suite": library["suite"]}, music_filter=pb.MusicFilter(**filt)), timeout=60)
    return {p.pattern_id for p in res.patterns}


def test_list_by_key_and_tempo_range(client: Client, library: dict) -> None:
    assert _list(client, library, key="G minor") == _ids(library, 1, 13)
    assert _list(client, library, key="g min") == _ids(library, 1, 13)  # spelled loosely, normalised
    assert _list(client, library, min_tempo_bpm=95, max_tempo_bpm=125) == _ids(library, 7, 12, 17)
    assert _list(client, library, min_tempo_bpm=125) == _ids(library, 1)
    assert _list(client, library, key="G minor", max_tempo_bpm=100) == _ids(library, 13)
    assert _list(client, library, key="F major") == set()


def test_stored_patterns_carry_their_descriptors(client: Client, library: dict) -> None:
    pid, truth = library["patterns"][12]
    pattern = client.stub.GetPattern(pb.GetPatternRequest(pattern_id=pid), timeout=60).pattern
    assert pattern.music.key == truth["key"]
    assert abs(pattern.music.tempo_bpm / truth["tempo_bpm"] - 1) <= 0.04
    assert not pattern.music.notes and not pattern.music.beats_seconds


def test_search_by_pattern_with_a_music_filter(client: Client, library: dict) -> None:
    anchor = library["patterns"][7][0]
    res = client.stub.SearchPatterns(pb.SearchPatternsRequest(
        pattern_id=anchor, top_k=10, tag_filter={"suite": library["suite"]},
        space=pb.SearchPatternsRequest.SPACE_WAV2VEC2,
        music_filter=pb.MusicFilter(key="G minor")), timeout=60)
    assert {m.pattern.pattern_id for m in res.matches} == _ids(library, 1, 13)


def test_text_and_music_space_search(client: Client, library: dict) -> None:
    pid = library["patterns"][7][0]
    pattern = client.stub.GetPattern(pb.GetPatternRequest(pattern_id=pid, include_embedding=True), timeout=60).pattern
    if not pattern.music.tags:
        pytest.skip("the musicnn tagger is not served by this model repository yet")
    res = client.stub.SearchPatterns(pb.SearchPatternsRequest(
        text="acoustic guitar", top_k=3, tag_filter={"suite": library["suite"]}), timeout=60)
    assert {m.pattern.pattern_id for m in res.matches} <= _ids(library, 1, 7, 13) and res.matches
    assert all(0 <= m.score <= 1 for m in res.matches)
    near = client.stub.SearchPatterns(pb.SearchPatternsRequest(
        pattern_id=pid, top_k=4, tag_filter={"suite": library["suite"]}), timeout=60)
    assert near.matches and pid not in {m.pattern.pattern_id for m in near.matches}
    assert len(pattern.music.embedding) == 408


def test_text_search_puts_patterns_with_more_of_the_named_tags_first(client: Client, library: dict) -> None:
    """"guitar with drums": the guitar-with-drums render holds both tags among its top five and comes before the
    solo guitars, whose one strong "guitar" tag scores higher on the mean; matches are ordered by how many of the
    named tags their top five hold."""
    res = client.stub.SearchPatterns(pb.SearchPatternsRequest(
        text="guitar with drums", top_k=10, tag_filter={"suite": library["suite"]}), timeout=60)
    held = [len({"guitar", "drums"} & {t.label for t in m.pattern.music.tags[:5]}) for m in res.matches]
    if not res.matches or not res.matches[0].pattern.music.tags:
        pytest.skip("the musicnn tagger is not served by this model repository")
    assert held == sorted(held, reverse=True) and held[0] == 2, held
    ranked = [m.pattern.pattern_id for m in res.matches]
    assert ranked.index(library["patterns"][1][0]) < ranked.index(library["patterns"][7][0]), held


def test_similar_sound_finds_the_same_instrument(client: Client, library: dict) -> None:
    """"Sounds similar" (SearchPatterns by a pattern, the music space by default): each guitar piece's two nearest
    patterns are the other two guitar pieces — with drums or without, in other keys and tempos — before the piano
    and the harpsichord. (The timbre embedding's margin here: cosine 0.965 vs 0.956 at the closest call.)"""
    guitars = (1, 7, 13)
    for i in guitars:
        res = client.stub.SearchPatterns(pb.SearchPatternsRequest(
            pattern_id=library["patterns"][i][0], top_k=2, tag_filter={"suite": library["suite"]}), timeout=60)
        assert {m.pattern.pattern_id for m in res.matches} == _ids(library, *(g for g in guitars if g != i)), i


def test_text_naming_nothing_known_is_invalid_argument(client: Client, library: dict) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.SearchPatterns(pb.SearchPatternsRequest(text="qwzx plorp"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tagger" in err.value.details()


@PROPERTY
@given(lo=st.one_of(st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e308, 60.0, 2000.0]), st.floats()),
       hi=st.one_of(st.sampled_from([0.0, math.nan, math.inf, 130.0, 5e-324]), st.floats()),
       key=st.one_of(st.sampled_from(NASTY), st.text(max_size=20)),
       tags=st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=10)), max_size=20))
def test_hostile_music_filters_never_crash(client: Client, library: dict, lo: float, hi: float, key: str,
                                           tags: list[str]) -> None:
    filt = pb.MusicFilter(min_tempo_bpm=lo, max_tempo_bpm=hi, key=key, tags=tags)
    try:
        res = client.stub.ListPatterns(pb.ListPatternsRequest(tag_filter={"suite": library["suite"]},
                                                              music_filter=filt), timeout=60)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        return
    for p in res.patterns:  # whatever passed must satisfy the filter
        assert not lo or p.music.tempo_bpm >= lo
        assert not hi or p.music.tempo_bpm <= hi


@PROPERTY
@given(text=st.one_of(st.sampled_from(NASTY + ["dark guitar with drums", "no vocals", "piano" * 300]),
                      st.text(max_size=60)),
       top_k=st.sampled_from([0, 1, 5, 100, 101, -1]))
def test_hostile_text_queries_never_crash(client: Client, library: dict, text: str, top_k: int) -> None:
    try:
        client.stub.SearchPatterns(pb.SearchPatternsRequest(text=text, top_k=top_k), timeout=60)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())


# --- the companion collection on existing and damaged stores (milvus-lite, no server) -------------------------------
def test_an_existing_store_gains_descriptors_without_losing_patterns(tmp_path: Path) -> None:
    import asyncio

    import numpy as np

    from grym_synth.memory.music_index import MusicFields, MusicQuery
    from grym_synth.memory.store import PatternStore, PatternStoreDamaged

    uri = str(tmp_path / "patterns.db")

    async def before() -> list[str]:
        old = PatternStore(uri, dim=8, model="wav2vec2", profile="tiny")  # a store from before music analysis
        old.open()
        ids = [(await old.insert(np.random.default_rng(i).normal(size=8).tolist(), duration_s=1.0, tags={},
                                 source="old")).id for i in range(3)]
        old.close()
        return ids

    async def after(ids: list[str]) -> None:
        store = PatternStore(uri, dim=8, model="wav2vec2", profile="tiny", music_dim=4)
        store.open()
        assert await store.count() == 3 and {p.id for p in await store.get_many(ids)} == set(ids)
        assert (await store.get(ids[0])).music is None
        new = await store.insert([1.0] * 8, duration_s=1.0, tags={}, source="new",
                                 music=MusicFields(tempo_bpm=100, key="A minor", embedding=[1.0, 0, 0, 0]))
        page, _ = await store.list(page_size=10, music=MusicQuery.parse(0, 0, "A minor", []))
        assert [p.id for p in page] == [new.id]
        assert len((await store.list(page_size=10))[0]) == 4
        assert [p.id for p in await store.search_music([1.0, 0, 0, 0], top_k=5)] == [new.id]
        await store.delete(new.id)
        assert await store.search_music([1.0, 0, 0, 0], top_k=5) == []
        store.close()

    ids = asyncio.run(before())
    asyncio.run(after(ids))
    manifest = tmp_path / "patterns.db" / "collections" / "grym_patterns_wav2vec2_tiny_music4" / "manifest.json"
    manifest.write_text(manifest.read_text()[:10])
    damaged = PatternStore(uri, dim=8, model="wav2vec2", profile="tiny", music_dim=4)
    with pytest.raises(PatternStoreDamaged, match="_music4/manifest.json is unreadable"):
        damaged.open()


def test_descriptors_move_to_a_new_embedding_layout(tmp_path: Path) -> None:
    """A store written with the 200-d layout (companion collection ``<patterns>_music``, built here as that version
    built it) opened with the timbre embedding: every pattern keeps its tempo, key and tags, none keeps the other
    layer's embedding (it is never searched), the old collection is gone, and opening again changes nothing."""
    import asyncio

    import numpy as np
    from pymilvus import MilvusClient

    from grym_synth.memory.music_index import MusicFields, MusicQuery, create_music_collection
    from grym_synth.memory.store import PatternStore

    uri = str(tmp_path / "patterns.db")
    legacy = "grym_patterns_wav2vec2_tiny_music"

    async def old_layout() -> list[str]:
        store = PatternStore(uri, dim=8, model="wav2vec2", profile="tiny")
        store.open()
        ids = [(await store.insert(np.random.default_rng(i).normal(size=8).tolist(), duration_s=1.0, tags={},
                                   source="old")).id for i in range(3)]
        store.close()
        client = MilvusClient(uri)
        create_music_collection(client, legacy, 2)
        client.insert(legacy, [MusicFields(tempo_bpm=90.0 + i, key="A minor", tags=[("guitar", 0.5, 1)],
                                           embedding=[0.0, 1.0]).row(pid, 2) for i, pid in enumerate(ids)])
        client.close()
        return ids

    async def new_layout(ids: list[str]) -> None:
        for _ in range(2):
            store = PatternStore(uri, dim=8, model="wav2vec2", profile="tiny", music_dim=4)
            store.open()
            assert legacy not in store._client.list_collections()
            records = await store.get_many(ids)
            await store.attach_music(records, include_embedding=True)
            assert sorted(r.music.tempo_bpm for r in records) == [90.0, 91.0, 92.0]
            assert all(r.music.key == "A minor" and r.music.tags[0][0] == "guitar" for r in records)
            assert all(r.music.embedding is None for r in records)
            page, _ = await store.list(page_size=10, music=MusicQuery.parse(0, 0, "A minor", []))
            assert {p.id for p in page} == set(ids)
            assert await store.search_music([1.0, 0, 0, 0], top_k=5) == []
            store.close()

    asyncio.run(new_layout(asyncio.run(old_layout())))
