"""Recall without Milvus: the rating-aware ranking formula, request keywords and the Milvus filter they become, the
feedback (ratings) table on SQLite, and the in-memory recall index against a brute-force substring search."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import pytest

from grym_synth.core.errors import InvalidArgument
from grym_synth.memory.learning import (DESCRIPTIVE_TAGS, MAX_COMMENT_CHARS, RatingSummary, keyword_filter, keywords,
                                        open_feedback_store, rank_recalled)
from grym_synth.memory.recall_index import RecallIndex
from grym_synth.memory.store import PatternRecord


# --- ranking with ratings ------------------------------------------------------------------------------------------
def record(pid: str, score: float) -> PatternRecord:
    return PatternRecord(id=pid, model="m", profile="tiny", duration_s=1, tags={}, created_at_us=0, source="t",
                         score=score)


def test_rank_recalled_formula() -> None:
    ranked = rank_recalled([record("a", 0.80), record("b", 0.78), record("c", 0.90)],
                           {"b": RatingSummary(count=1, total=5), "c": RatingSummary(count=10, total=10)})
    assert [r.record.id for r in ranked] == ["b", "a", "c"]
    scores = {r.record.id: r.score for r in ranked}
    assert scores["a"] == pytest.approx(0.80), "unrated keeps its similarity"
    assert scores["b"] == pytest.approx(0.78 + 0.25 * ((5 + 6) / 3 - 3) / 2)
    assert scores["c"] == pytest.approx(0.90 + 0.25 * ((10 + 6) / 12 - 3) / 2)
    assert ranked[0].as_record().score == pytest.approx(scores["b"]) and ranked[0].record.score == 0.78


# --- text recall ------------------------------------------------------------------------------------------------------
def test_keywords_and_filter_quoting() -> None:
    assert keywords("Please compose a calm, 90 second PIANO piece like the lo-fi one") == ["calm", "piano", "lo-fi"]
    expr = keyword_filter(["calm"])
    assert 'metadata["prompt"] like "%calm%"' in expr and 'like "%Calm%"' in expr and 'tags["mood"] like' in expr


# --- feedback ---------------------------------------------------------------------------------------------------------
async def test_feedback_validation_and_persistence(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'wf.db'}"
    store = open_feedback_store(url)
    for bad in (0, 6, True, 3.5):
        with pytest.raises(InvalidArgument, match="rating must be an integer 1..5"):
            await store.rate("p1", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="comment"):
        await store.rate("p1", 3, "x" * (MAX_COMMENT_CHARS + 1))
    await store.rate("p1", 5, "lovely")
    await store.rate("p1", 3)
    store.close()
    reopened = open_feedback_store(url)
    try:
        summary = (await reopened.ratings(["p1", "never-rated"]))["p1"]
        assert (summary.count, summary.mean) == (2, 4.0)
        assert [(r, c) for r, c, _ in await reopened.comments("p1")] == [(3, ""), (5, "lovely")]
        assert await reopened.forget("p1") == 2 and await reopened.ratings(["p1"]) == {}
    finally:
        reopened.close()


# --- the in-memory recall index against brute force ----------------------------------------------------------------
def brute_force(records: Mapping[str, PatternRecord], words: list[str],
                tag_filter: Mapping[str, str] | None = None) -> set[str]:
    def searchable(r: PatternRecord) -> list[str]:
        return [r.metadata.get("prompt", "").lower(), *(r.tags.get(k, "").lower() for k in DESCRIPTIVE_TAGS)]

    return {r.id for r in records.values()
            if any(w in field for w in words for field in searchable(r))
            and all(r.tags.get(k) == v for k, v in (tag_filter or {}).items())}


def test_random_changes_match_brute_force() -> None:
    """Adds, removes, cached words and vocabulary compaction (many tokens coming and going)."""
    rng = random.Random(3)
    syllables = ["pi", "an", "o", "cal", "m", "tech", "no", "arp", "eg", "gio", "lo", "fi", "-", "ba", "ss", "7"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))

    index = RecallIndex()
    index.ready = True
    live: dict[str, PatternRecord] = {}
    queries = ["pia", "ano", "cal", "tech", "arpeg", "lo-fi", "bass", "no-", "gio", "fim", "calm"]
    adds = 0
    for step in range(4000):
        removal = 0.2 if step < 1500 else 0.8 if step < 3000 else 0.4  # grow, shrink, steady
        if live and rng.random() < removal:
            victim = rng.choice(sorted(live))
            del live[victim]
            index.remove(victim)
        else:
            pid = f"p{step:05d}"
            tags = {"mood": rng.choice(["calm", "dark", word()]), "source": word()}
            if rng.random() < 0.5:
                tags["genre"] = word().upper()
            record = PatternRecord(id=pid, model="m", profile="tiny", duration_s=1, tags=tags, created_at_us=step,
                                   source="t", metadata={"prompt": " ".join(word() for _ in range(3)) + f" u{step}x"})
            live[pid] = record
            index.add(record)
            adds += 1
        if step % 50 == 0:
            words = rng.sample(queries, 2)
            tag_filter = {"mood": "calm"} if step % 100 == 0 else None
            got = index.candidates(words, tag_filter, limit=10_000)
            assert {r.id for r in got} == brute_force(live, words, tag_filter), (step, words)
            assert [r.created_at_us for r in got] == sorted((r.created_at_us for r in got), reverse=True)
    assert index.ids() == set(live)
    # every add brought a token of its own ("u<step>x"): a shorter log means it was compacted along the way
    assert len(index._vocab_log) < adds and len(index._vocab_log) <= 2 * len(index._postings) + 1024
