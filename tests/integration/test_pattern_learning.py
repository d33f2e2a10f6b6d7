"""Pattern learning on a real PatternStore (milvus-lite file) and a real SQLite feedback table: clustering of
synthetic embeddings with known groups, ratings, and text recall ranked by rating. The ranking formula, keywords and
the feedback table on its own are in tests/unit/test_recall.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from grym_synth.core.errors import InvalidArgument, NotFound
from grym_synth.memory.learning import FeedbackStore, detect_clusters, rate_pattern, recall_for_request
from grym_synth.memory.store import PatternStore

DIM = 8

GROUPS = {
    "calm": (9, {"mood": "calm", "instruments": "piano", "source": "compose"}, "calm music with piano"),
    "dark": (7, {"mood": "dark", "genre": "techno", "source": "compose"}, "dark techno music, driving bass"),
    "bright": (5, {"mood": "bright", "instruments": "flute", "source": "upload"}, "bright music with flute, birds"),
}


@pytest.fixture
def patterns(tmp_path: Path) -> Iterator[PatternStore]:
    store = PatternStore(str(tmp_path / "milvus" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny")
    store.open()
    yield store
    store.close()


async def add_groups(patterns: PatternStore) -> dict[str, set[str]]:
    """Three well-separated directions with noise around each; returns group -> pattern ids."""
    rng = np.random.default_rng(7)
    centres = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:3]
    members: dict[str, set[str]] = {}
    for (name, (count, tags, prompt)), centre in zip(GROUPS.items(), centres):
        members[name] = set()
        for i in range(count):
            vector = centre + 0.12 * rng.standard_normal(DIM)
            record = await patterns.insert(vector.tolist(), duration_s=5.0, tags=tags, source="test",
                                           metadata={"prompt": f"{prompt} #{i}", "seed": str(i)})
            members[name].add(record.id)
    return members


# --- clustering -------------------------------------------------------------------------------------------------------
async def test_clusters_recover_known_groups(patterns: PatternStore, feedback: FeedbackStore) -> None:
    groups = await add_groups(patterns)
    calm_ids = sorted(groups["calm"])
    await feedback.rate(calm_ids[0], 5)
    await feedback.rate(calm_ids[1], 4)
    await feedback.rate(sorted(groups["dark"])[0], 1)
    clusters = await detect_clusters(patterns, feedback=feedback)
    assert [set(c.member_ids) for c in clusters] == [groups["calm"], groups["dark"], groups["bright"]]
    calm, dark, bright = clusters
    assert [c.index for c in clusters] == [0, 1, 2] and [c.size for c in clusters] == [9, 7, 5]
    assert calm.top_tags == {"instruments": "piano", "mood": "calm"}, "bookkeeping tags (source) are not labels"
    assert calm.label == "piano, calm" and calm.top_words == [], "prompt words already in the tags are not repeated"
    assert dark.top_tags == {"genre": "techno", "mood": "dark"} and dark.top_words == ["bass", "driving"]
    assert dark.label == "techno, dark, bass, driving"
    assert bright.top_words == ["birds"] and bright.label == "flute, bright, birds"
    assert calm.mean_rating == 4.5 and calm.rating_count == 2
    assert dark.mean_rating == 1.0 and bright.mean_rating is None and bright.rating_count == 0
    for c in clusters:
        assert np.linalg.norm(c.centroid) == pytest.approx(1.0, abs=1e-6)
        assert c.cohesion > 0.9
    again = await detect_clusters(patterns, feedback=feedback)
    assert again == clusters, "clustering is deterministic"


async def test_fixed_k_and_bounds(patterns: PatternStore) -> None:
    assert await detect_clusters(patterns) == [], "an empty memory has no clusters"
    groups = await add_groups(patterns)
    two = await detect_clusters(patterns, k=2)
    assert len(two) == 2 and sum(c.size for c in two) == 21
    assert any(set(c.member_ids) == groups["calm"] or set(c.member_ids) >= groups["calm"] for c in two)
    one = await detect_clusters(patterns, k=1)
    assert len(one) == 1 and one[0].size == 21
    for bad in (0, 22):
        with pytest.raises(InvalidArgument, match="k must be 1..21"):
            await detect_clusters(patterns, k=bad)


# --- text recall ------------------------------------------------------------------------------------------------------
async def test_recall_for_request_matches_words_and_tags(patterns: PatternStore, feedback: FeedbackStore) -> None:
    groups = await add_groups(patterns)
    upper = await patterns.insert([0.5] * DIM, duration_s=3, tags={}, source="t",
                                  metadata={"prompt": "Calm Piano Nocturne"})
    found = await recall_for_request(patterns, feedback, "a calm piano piece for the evening", 10)
    ids = [r.id for r in found]
    assert upper.id in ids, "matching ignores case"
    assert set(ids) <= groups["calm"] | {upper.id}
    assert len(ids) == 10 and all(r.score is not None and r.score >= 2 / 3 for r in found)
    techno = await recall_for_request(patterns, feedback, "dark techno", 3)
    assert len(techno) == 3 and {r.id for r in techno} <= groups["dark"]
    filtered = await recall_for_request(patterns, feedback, "music with flute or piano", 20,
                                        tag_filter={"source": "upload"})
    assert {r.id for r in filtered} == groups["bright"]
    assert await recall_for_request(patterns, feedback, "please make it 90 seconds", 5) == []
    with pytest.raises(InvalidArgument):
        await recall_for_request(patterns, feedback, "piano", 0)


async def test_ratings_change_recall_order(patterns: PatternStore, feedback: FeedbackStore) -> None:
    first = await patterns.insert([1.0] * DIM, duration_s=3, tags={"mood": "calm"}, source="t",
                                  metadata={"prompt": "calm piano"})
    second = await patterns.insert([0.5] * DIM, duration_s=3, tags={"mood": "calm"}, source="t",
                                   metadata={"prompt": "calm piano"})
    low, high = sorted([first.id, second.id])
    before = await recall_for_request(patterns, feedback, "calm piano", 2)
    assert [r.id for r in before] == [low, high], "equal matches tie-break on id"
    await rate_pattern(patterns, feedback, high, 5, "great")
    await rate_pattern(patterns, feedback, low, 1)
    after = await recall_for_request(patterns, feedback, "calm piano", 2)
    assert [r.id for r in after] == [high, low]
    assert (after[0].score or 0) > 1.0 > (after[1].score or 0)
    with pytest.raises(NotFound):
        await rate_pattern(patterns, feedback, "00000000-0000-4000-8000-000000000000", 4)
