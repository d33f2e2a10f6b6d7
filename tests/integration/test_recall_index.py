"""The in-memory recall index (grym_synth/memory/recall_index.py) against the Milvus ``like`` query it replaces, on
real milvus-lite files: the same patterns and scores for a varied set of patterns and requests, kept in sync by the
store's own writes, reconciled with another writer's, falling back to Milvus until loaded, and riding out Milvus
outages. The pure in-memory behaviour (word cache, vocabulary compaction) is checked against a brute-force
substring search in tests/unit/test_recall.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from grym_synth.core.errors import InvalidArgument, Unavailable
from grym_synth.memory.learning import FeedbackStore, keywords, query_candidates, recall_for_request
from grym_synth.memory.store import PatternRecord, PatternStore
from grym_synth.memory.recall_index import RecallIndex

DIM = 8

# (prompt or None for no prompt key, tags): spellings LIKE finds (lower, Capitalised, UPPER), words inside longer
# tokens, punctuation, words only in bookkeeping tags (never searched), missing fields, non-ASCII.
PATTERNS: list[tuple[str | None, dict[str, str]]] = [
    ("calm piano nocturne", {"mood": "calm", "instruments": "piano", "source": "compose"}),
    ("Calm Piano Etude", {}),
    ("DARK TECHNO RUMBLE", {"genre": "techno"}),
    ("lo-fi hip hop beat, vinyl crackle", {"genre": "lo-fi", "style": "chill"}),
    ("drum-and-bass roller", {"genre": "drum-and-bass", "tempo": "fast"}),
    ("pianos and strings, lush", {"instruments": "strings,piano"}),
    ("ambient pad", {"mood": "dreamy", "source": "piano-upload", "segment": "rain"}),
    ("", {"mood": "melancholic", "era": "1970s", "label": "Rainy Day"}),
    (None, {"instrument": "flute", "tempo": "slow"}),
    ("field recording: rain on a tin roof; thunder!", {"mood": "somber"}),
    ("Café jazz trio (brushes)", {"genre": "jazz", "era": "50s"}),
    ("synthwave 120bpm driving arpeggio", {"genre": "synthwave", "tempo_bpm": "120"}),
    ("epic cinematic choir", {"mood": "epic", "style": "cinematic", "workflow_id": "choir-42"}),
    ("birdsong at dawn", {"label": "Dawn Chorus", "mood": "bright"}),
    ("warm analog bass", {"instruments": "bass", "source": "compose"}),
    ("x", {}),
]

REQUESTS: list[tuple[str, dict[str, str] | None]] = [
    ("a calm piano piece for the evening", None),
    ("dark techno", None),
    ("lo-fi beat with vinyl", None),
    ("drum-and-bass", None),
    ("bass", None),
    ("piano", {"mood": "calm"}),
    ("piano", {"source": "compose"}),
    ("rain and thunder", None),
    ("upload", None),
    ("melancholic 1970s", None),
    ("cafe jazz", None),
    ("caf", None),
    ("slow flute", None),
    ("epic cinematic choir at dawn", None),
    ("ambient", {"mood": "dreamy"}),
    ("ambient", {"mood": "calm"}),
    ("strings", {"instruments": "strings,piano"}),
    ("chill", None),
    ("arp", None),
    ("ing", None),
    ("synthwave 120bpm", None),
    ("chorus", None),
    ("music", None),
]


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "milvus" / "patterns.db")


@pytest.fixture
def patterns(db_path: str) -> Iterator[PatternStore]:
    store = PatternStore(db_path, dim=DIM, model="wav2vec2", profile="tiny", recall_index=RecallIndex())
    store.open()
    yield store
    store.close()


def index_of(store: PatternStore) -> RecallIndex:
    assert store.recall_index is not None
    return store.recall_index


async def add(store: PatternStore, prompt: str | None, tags: Mapping[str, str], seed: int = 0) -> PatternRecord:
    vector = np.random.default_rng(seed).standard_normal(DIM) + 0.1
    return await store.insert(vector.tolist(), duration_s=2.0, tags=tags, source="test",
                              metadata={} if prompt is None else {"prompt": prompt, "seed": str(seed)})


async def add_all(store: PatternStore) -> list[PatternRecord]:
    return [await add(store, prompt, tags, i) for i, (prompt, tags) in enumerate(PATTERNS)]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def recall_both(store: PatternStore, feedback: FeedbackStore | None, request: str,
                      tag_filter: Mapping[str, str] | None, top_k: int = 20) -> tuple[list, list]:
    """recall_for_request through the index and through Milvus (the same store, index switched off)."""
    index = index_of(store)
    via_index = await recall_for_request(store, feedback, request, top_k, tag_filter=tag_filter)
    index.ready = False
    try:
        via_milvus = await recall_for_request(store, feedback, request, top_k, tag_filter=tag_filter)
    finally:
        index.ready = True
    return via_index, via_milvus


# --- the same answers as the Milvus query ------------------------------------------------------------------------------
async def test_index_finds_what_the_milvus_filter_finds(patterns: PatternStore, feedback: FeedbackStore) -> None:
    records = await add_all(patterns)
    index = index_of(patterns)
    await index.load(patterns)
    assert index.ready and len(index) == len(PATTERNS)
    await feedback.rate(records[0].id, 5)
    await feedback.rate(records[1].id, 1)
    await feedback.rate(records[5].id, 4)
    matched_any = 0
    for request, tag_filter in REQUESTS:
        words = keywords(request)
        if words:
            in_memory = {r.id for r in index.candidates(words, tag_filter)}
            in_milvus = {r.id for r in await query_candidates(patterns, words, tag_filter)}
            assert in_memory == in_milvus, (request, tag_filter)
            matched_any += bool(in_memory)
        via_index, via_milvus = await recall_both(patterns, feedback, request, tag_filter)
        assert [(r.id, r.score) for r in via_index] == [(r.id, r.score) for r in via_milvus], (request, tag_filter)
        assert via_index == via_milvus  # every field, not only ids and scores
    assert matched_any >= 15, "the requests exercise matches, not only misses"


async def test_what_matches(patterns: PatternStore) -> None:
    records = await add_all(patterns)
    index = index_of(patterns)
    await index.load(patterns)

    def ids(request: str, tag_filter: Mapping[str, str] | None = None) -> set[int]:
        return {next(i for i, r in enumerate(records) if r.id == c.id)
                for c in index.candidates(keywords(request), tag_filter)}

    assert ids("piano") == {0, 1, 5}, "lower and Capitalised prompts, a longer token ('pianos'), a tag list"
    assert ids("techno") == {2} and ids("arp") == {11}
    assert ids("upload") == set() and ids("choir-42") == set(), "bookkeeping tags are not searched"
    assert ids("rain") == {7, 9}, "'Rainy Day' label and the prompt; not the bookkeeping 'segment' tag"
    assert ids("flute") == {8}, "a pattern without a prompt is found by its tags"
    assert ids("piano", {"mood": "calm"}) == {0} and ids("piano", {"mood": "calm", "source": "x"}) == set()
    with pytest.raises(InvalidArgument):
        await recall_for_request(patterns, None, "piano", 5, tag_filter={"bad key": "v"})


async def test_matching_ignores_case_entirely(patterns: PatternStore) -> None:
    """The one documented difference: LIKE tried lower, Capitalised and UPPER spellings only."""
    await add(patterns, "calm piano", {})
    odd = await add(patterns, "PiAnO SoNaTa", {"mood": "cAlM"}, 1)
    index = index_of(patterns)
    await index.load(patterns)
    for request in ("piano", "sonata", "calm"):
        words = keywords(request)
        in_memory = {r.id for r in index.candidates(words)}
        in_milvus = {r.id for r in await query_candidates(patterns, words)}
        assert in_memory - in_milvus == {odd.id}, request


async def test_candidates_are_newest_first_and_capped(patterns: PatternStore) -> None:
    made = [await add(patterns, f"calm piano take {i}", {"mood": "calm"}, i) for i in range(6)]
    await add(patterns, "dark techno", {}, 99)
    index = index_of(patterns)
    await index.load(patterns)
    newest = sorted(made, key=lambda r: (-r.created_at_us, r.id))
    assert [r.id for r in index.candidates(["piano"], limit=3)] == [r.id for r in newest[:3]]
    assert [r.id for r in index.candidates(["calm", "piano"])] == [r.id for r in newest]
    assert all(r.embedding is None and r.score is None for r in index.candidates(["piano"]))


# --- staying in sync ----------------------------------------------------------------------------------------------------
async def test_the_stores_own_writes_update_the_index(patterns: PatternStore, feedback: FeedbackStore) -> None:
    index = index_of(patterns)
    await index.load(patterns)
    assert index.ready and len(index) == 0
    assert index.candidates(["arpeg"]) == []  # the word is now cached, with an empty vocabulary
    first = await add(patterns, "glassy arpeggio", {"mood": "bright"})
    second = await add(patterns, "arpeggiator bass line", {"genre": "techno"}, 1)
    assert {r.id for r in index.candidates(["arpeg"])} == {first.id, second.id}, "the cached word sees new tokens"
    found, in_milvus = await recall_both(patterns, feedback, "bright arpeggi", None)
    assert [r.id for r in found] == [first.id, second.id] and found == in_milvus
    assert [r.score for r in found] == [1.0, 0.5]
    await patterns.delete(first.id)
    assert first.id not in index and [r.id for r in index.candidates(["arpeg"])] == [second.id]
    found, in_milvus = await recall_both(patterns, feedback, "bright arpeggi", None)
    assert [r.id for r in found] == [second.id] and found == in_milvus
    found[0].tags["genre"] = "changed"
    assert index.candidates(["arpeg"])[0].tags["genre"] == "techno", "recall hands out copies"


async def test_writes_before_the_load_are_kept(patterns: PatternStore) -> None:
    index = index_of(patterns)
    early = await add(patterns, "calm piano", {})
    gone = await add(patterns, "calm harp", {}, 1)
    await patterns.delete(gone.id)
    await index.load(patterns)
    assert index.ids() == {early.id}


async def test_reconcile_picks_up_another_writers_changes(patterns: PatternStore, db_path: str) -> None:
    other = PatternStore(db_path, dim=DIM, model="wav2vec2", profile="tiny")  # another replica: no index
    other.open()
    try:
        kept = await add(other, "calm piano", {"mood": "calm"})
        deleted = await add(other, "calm harp", {"mood": "calm"}, 1)
        index = index_of(patterns)
        await index.load(patterns)
        assert index.ids() == {kept.id, deleted.id}
        mine = await add(patterns, "calm flute", {"mood": "calm"}, 2)
        theirs = await add(other, "calm strings", {"mood": "calm"}, 3)
        await other.delete(deleted.id)
        assert index.ids() == {kept.id, deleted.id, mine.id}, "other writers are seen at the next reconcile"
        assert await index.reconcile(patterns) == (1, 1)
        assert index.ids() == {kept.id, mine.id, theirs.id}
        words = keywords("calm music")
        assert ({r.id for r in index.candidates(words)} ==
                {r.id for r in await query_candidates(patterns, words)})
        assert await index.reconcile(patterns) == (0, 0)
    finally:
        other.close()


async def test_local_writes_win_over_a_stale_milvus_view(patterns: PatternStore, db_path: str) -> None:
    """A Milvus server may not show a write made a moment ago: the replica's own recent writes stand."""
    other = PatternStore(db_path, dim=DIM, model="wav2vec2", profile="tiny")
    other.open()
    try:
        index = index_of(patterns)
        await index.load(patterns)
        listed = await add(other, "calm piano", {"mood": "calm"})  # in Milvus
        unlisted = PatternRecord(id="not-yet-visible", model="wav2vec2", profile="tiny", duration_s=1.0,
                                 tags={"mood": "calm"}, created_at_us=1, source="test",
                                 metadata={"prompt": "calm harp"})
        index.add(unlisted)  # as if Milvus had accepted it but did not list it yet
        index.remove(listed.id)  # as if deleted here while Milvus still lists it
        assert await index.reconcile(patterns) == (0, 0)
        assert index.ids() == {unlisted.id}
        index.local_wins_s = 0.0  # later: Milvus is right again
        assert await index.reconcile(patterns) == (1, 1)
        assert index.ids() == {listed.id}
    finally:
        other.close()


# --- fallback and outages ------------------------------------------------------------------------------------------------
async def test_recall_queries_milvus_until_the_index_is_loaded(patterns: PatternStore) -> None:
    record = await add(patterns, "calm piano", {"mood": "calm"})
    index = index_of(patterns)
    before = await recall_for_request(patterns, None, "calm piano", 5)
    assert [r.id for r in before] == [record.id] and not index.ready
    patterns.close()  # not loaded yet: recall needs Milvus
    with pytest.raises(Unavailable):
        await recall_for_request(patterns, None, "calm piano", 5)
    patterns.open()
    await index.load(patterns)
    patterns.close()  # loaded: recall answers from memory
    assert await recall_for_request(patterns, None, "calm piano", 5) == before
    patterns.open()


async def test_sync_task_rides_out_milvus_outages(patterns: PatternStore, db_path: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="grym_synth.memory.recall_index")
    record = await add(patterns, "calm piano", {"mood": "calm"})
    index = index_of(patterns)
    patterns.close()  # Milvus down when the orchestrator starts
    task = asyncio.create_task(index.keep_in_sync(patterns, 0.05, retry_s=0.05))
    try:
        await wait_for(lambda: "recall index not loaded" in caplog.text)
        assert not index.ready
        patterns.open()
        await wait_for(lambda: index.ready)
        found = await recall_for_request(patterns, None, "calm piano", 5)
        assert [r.id for r in found] == [record.id]

        patterns.close()  # an outage between two reconciles
        caplog.clear()
        await wait_for(lambda: "not reconciled" in caplog.text)
        assert await recall_for_request(patterns, None, "calm piano", 5) == found
        assert not task.done()

        patterns.open()  # back: the next reconcile sees what another replica wrote meanwhile
        other = PatternStore(db_path, dim=DIM, model="wav2vec2", profile="tiny")
        other.open()
        try:
            theirs = await add(other, "calm piano trio", {"mood": "calm"}, 1)
        finally:
            other.close()
        await wait_for(lambda: theirs.id in index)
        assert (await recall_for_request(patterns, None, "calm piano trio", 5))[0].id == theirs.id
    finally:
        task.cancel()
