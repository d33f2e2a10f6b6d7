"""Learning from pattern memory: recurring-pattern clusters, user ratings, and text recall for the coordinator.

Clusters show what the memory keeps returning to ("calm piano" x 14, "dark techno" x 6): spherical k-means on
L2-normalised embeddings (cosine is what the collection is indexed by, so the clusters agree with recall), with a
deterministic k-means++ start (fixed seeds, several restarts, lowest inertia wins) so the same memory always gives
the same clusters. k is picked by the best cosine silhouette over 2..``max_k`` unless the caller fixes it.

Ratings re-rank recall. The formula (:func:`rank_recalled`)::

    adjusted = (sum_of_ratings + PRIOR * PRIOR_WEIGHT) / (count + PRIOR_WEIGHT)     # Bayesian mean, PRIOR = 3
    score    = similarity + RATING_WEIGHT * (adjusted - 3) / 2                       # RATING_WEIGHT = 0.25

An unrated pattern keeps its similarity; one 5-star rating adds 0.083, many approach +0.25 (and 1-star -0.25),
so ratings reorder close matches but never lift an unrelated pattern over a clearly similar one.

The feedback table lives in the same database as the workflow records (:mod:`grym_synth.workflow.store`), as its own
migration component.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grym_synth.core.errors import InvalidArgument
from grym_synth.core.compute import run_cpu
from grym_synth.memory.store import (MAX_TOP_K, PatternRecord, PatternStore, check_pattern_id, quote, tag_filter_expr,
                                     validate_tags)
from grym_synth.core.text import FILLER
from grym_synth.core.db import Database, Migration, now_us, truncate

log = logging.getLogger(__name__)

RATING_PRIOR = 3.0
PRIOR_WEIGHT = 2.0
RATING_WEIGHT = 0.25
MAX_COMMENT_CHARS = 1_000  # the API's limit (RatePatternRequest.comment)
MAX_CLUSTER_COUNT = 50  # the most clusters a caller may ask for (ListPatternClustersRequest.cluster_count)
MAX_CLUSTER_PATTERNS = 20_000
SILHOUETTE_SAMPLE = 2_000
FETCH_BATCH = 256
RECALL_CANDIDATES = 200
MAX_KEYWORDS = 8
# Tags whose values describe the music (and so may match words of a request).
DESCRIPTIVE_TAGS = ("mood", "genre", "instruments", "instrument", "style", "tempo", "era", "label")
# Tags that say where a pattern came from, not what it sounds like: useless as cluster labels.
BOOKKEEPING_TAGS = frozenset({"source", "planner", "segment", "varied_from", "workflow_id", "tempo_bpm"})
STOPWORDS = FILLER | frozenset(
    "with and music tempo bpm the around low quality one two three four five six seven eight nine ten half "
    "any other".split())


# --- feedback -------------------------------------------------------------------------------------------------------
FEEDBACK_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "pattern_feedback", (
        "CREATE TABLE pattern_feedback (id {serial_pk}, pattern_id TEXT NOT NULL, rating INTEGER NOT NULL, "
        "comment TEXT NOT NULL DEFAULT '', created_at_us {bigint} NOT NULL)",
        "CREATE INDEX pattern_feedback_pattern ON pattern_feedback (pattern_id)",
    )),
)


@dataclass(frozen=True)
class RatingSummary:
    count: int
    total: int

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def adjusted(self) -> float:
        """Bayesian mean: a single rating moves a pattern less than many agreeing ones."""
        return (self.total + RATING_PRIOR * PRIOR_WEIGHT) / (self.count + PRIOR_WEIGHT)


class FeedbackStore:
    """User ratings (1-5, optional comment) of stored patterns; every rating is kept, summaries aggregate them."""

    def __init__(self, db: Database | str) -> None:
        self.db = db if isinstance(db, Database) else Database(db)
        self._opened = False

    def open(self) -> "FeedbackStore":
        self.db.open()
        self._opened = True
        self.db.migrate("feedback", FEEDBACK_MIGRATIONS)
        return self

    def close(self) -> None:
        if self._opened:
            self._opened = False
            self.db.close()

    async def rate(self, pattern_id: str, rating: int, comment: str = "") -> None:
        """Record one rating. Checking that the pattern exists is the caller's job (:func:`rate_pattern`),
        because the feedback store does not see pattern memory."""
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
            raise InvalidArgument(f"rating must be an integer 1..5, got {rating!r}")
        if not pattern_id or len(pattern_id) > 64:
            raise InvalidArgument("pattern_id must be 1..64 characters")
        if len(comment) > MAX_COMMENT_CHARS:
            raise InvalidArgument(f"comment is {len(comment)} characters; at most {MAX_COMMENT_CHARS} are allowed")
        await self.db.run(lambda conn: self.db.execute(
            conn, "INSERT INTO pattern_feedback (pattern_id, rating, comment, created_at_us) VALUES (?, ?, ?, ?)",
            (pattern_id, rating, comment, now_us())))

    async def ratings(self, ids: Iterable[str]) -> dict[str, RatingSummary]:
        """Summaries for the rated ones among ``ids`` (unrated ids are absent)."""
        ids = list(dict.fromkeys(ids))

        def op(conn: Any) -> dict[str, RatingSummary]:
            out: dict[str, RatingSummary] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = self.db.execute(conn, "SELECT pattern_id, COUNT(*), SUM(rating) FROM pattern_feedback "
                                             f"WHERE pattern_id IN ({', '.join('?' * len(chunk))}) "
                                             "GROUP BY pattern_id", chunk).fetchall()
                out.update({str(r[0]): RatingSummary(int(r[1]), int(r[2])) for r in rows})
            return out

        return await self.db.run(op) if ids else {}

    async def comments(self, pattern_id: str, limit: int = 20) -> list[tuple[int, str, int]]:
        """Newest (rating, comment, created_at_us) first."""
        rows = await self.db.run(lambda conn: self.db.execute(
            conn, "SELECT rating, comment, created_at_us FROM pattern_feedback WHERE pattern_id = ? "
                  "ORDER BY created_at_us DESC, id DESC LIMIT ?", (pattern_id, limit)).fetchall())
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def forget(self, pattern_id: str) -> int:
        """Drop the ratings of a deleted pattern; returns how many were removed."""
        cur = await self.db.run(lambda conn: self.db.execute(
            conn, "DELETE FROM pattern_feedback WHERE pattern_id = ?", (pattern_id,)))
        return int(cur.rowcount)


def open_feedback_store(url_or_db: str | Database) -> FeedbackStore:
    """Open the feedback table in the workflow database (pass ``workflow_store.db`` to share its connection)."""
    return FeedbackStore(url_or_db).open()


async def rate_pattern(patterns: PatternStore, feedback: FeedbackStore, pattern_id: str, rating: int,
                       comment: str = "") -> RatingSummary:
    """Rate an existing pattern (NOT_FOUND otherwise) and return its updated summary."""
    check_pattern_id(pattern_id)
    await patterns.get(pattern_id)
    await feedback.rate(pattern_id, rating, comment)
    return (await feedback.ratings([pattern_id]))[pattern_id]


# --- ranking --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranked:
    record: PatternRecord
    similarity: float
    rating: RatingSummary | None
    score: float

    def as_record(self) -> PatternRecord:
        """A copy of the record whose ``score`` is the combined score (the original is left untouched)."""
        return dataclasses.replace(self.record, score=self.score)


def rank_recalled(matches: Sequence[PatternRecord], ratings: Mapping[str, RatingSummary], *,
                  weight: float = RATING_WEIGHT) -> list[Ranked]:
    """Order matches by similarity (``record.score``) adjusted by rating; see the module docstring's formula.
    Ties break on id, so the order is deterministic."""
    ranked = []
    for m in matches:
        similarity = float(m.score) if m.score is not None else 0.0
        summary = ratings.get(m.id)
        bonus = weight * ((summary.adjusted if summary else RATING_PRIOR) - RATING_PRIOR) / 2
        ranked.append(Ranked(m, similarity, summary, similarity + bonus))
    ranked.sort(key=lambda r: (-r.score, r.record.id))
    return ranked


# --- text recall ----------------------------------------------------------------------------------------------------
KEYWORD = re.compile(r"[a-z][a-z0-9-]{2,31}")


def keywords(text: str) -> list[str]:
    """Content words of a request, safe to put into a LIKE pattern (letters, digits, '-')."""
    words = re.findall(r"[a-z][a-z0-9-]{2,31}", text.lower())
    return list(dict.fromkeys(w for w in words if w not in STOPWORDS))[:MAX_KEYWORDS]


def keyword_filter(words: Sequence[str]) -> str:
    """A Milvus expression matching patterns whose prompt or descriptive tags contain any word. LIKE is
    case-sensitive, so lower, Capitalised and UPPER spellings are all tried. Words are :func:`keywords` output
    (``[a-z][a-z0-9-]*``: no LIKE wildcard, no quote); anything else is refused, and values are quoted with
    :func:`~grym_synth.memory.store.quote` all the same (milvus-lite has no filter templating)."""
    clauses = []
    for word in words:
        if not KEYWORD.fullmatch(word):
            raise InvalidArgument(f"recall words are letters, digits and '-', got {word[:40]!r}")
        for variant in dict.fromkeys((word, word.capitalize(), word.upper())):
            pattern = quote(f"%{variant}%")
            clauses.append(f'metadata["prompt"] like {pattern}')
            clauses.extend(f"tags[{quote(key)}] like {pattern}" for key in DESCRIPTIVE_TAGS)
    return " or ".join(clauses)


def keyword_similarity(record: PatternRecord, words: Sequence[str]) -> float:
    """Fraction of the request's words found in the pattern's prompt and tags."""
    text = " ".join([record.metadata.get("prompt", ""), *record.tags.values()]).lower()
    return sum(1 for w in words if w in text) / len(words) if words else 0.0


async def recall_for_request(store: PatternStore, feedback: FeedbackStore | None, request_text: str, top_k: int,
                             *, tag_filter: Mapping[str, str] | None = None,
                             candidates: int = RECALL_CANDIDATES) -> list[PatternRecord]:
    """Stored patterns relevant to a text request (no audio to search with): keyword match against prompts and
    descriptive tags, scored by the fraction of words matched, re-ranked by rating. The records' ``score`` is the
    combined score.

    The matching runs on the store's in-memory :class:`~grym_synth.memory.recall_index.RecallIndex` once it is loaded (no
    I/O: Compose runs this before the coordinator's first token), else as a Milvus query
    (:func:`query_candidates`); both find the same patterns (see :mod:`grym_synth.memory.recall_index` for the one,
    documented, difference in case handling)."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be 1..{MAX_TOP_K}, got {top_k}")
    words = keywords(request_text)
    if not words:
        return []
    if tag_filter:
        validate_tags(tag_filter, "tag_filter")
    index = store.recall_index
    from_index = index is not None and index.ready
    if from_index:
        found = index.candidates(words, tag_filter, limit=candidates)
    else:
        found = await query_candidates(store, words, tag_filter, limit=candidates)
    scored = [dataclasses.replace(r, score=keyword_similarity(r, words)) for r in found]
    scored = [r for r in scored if r.score]
    ratings = await feedback.ratings([r.id for r in scored]) if feedback and scored else {}
    recalled = [r.as_record() for r in rank_recalled(scored, ratings)[:top_k]]
    if from_index:  # the index's records share their dicts with it: hand out copies
        recalled = [dataclasses.replace(r, tags=dict(r.tags), metadata=dict(r.metadata)) for r in recalled]
    return recalled


async def query_candidates(store: PatternStore, words: Sequence[str], tag_filter: Mapping[str, str] | None = None,
                           *, limit: int = RECALL_CANDIDATES) -> list[PatternRecord]:
    """Recall's matching as a Milvus query (``like`` filters): used until the recall index is loaded."""
    expr = f"({keyword_filter(words)})"
    if tag_filter:
        expr += f" and {tag_filter_expr(tag_filter)}"
    return await store.query(expr, limit=limit)


# --- clustering -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """One recurring pattern family."""

    index: int
    label: str
    size: int
    centroid: list[float]
    member_ids: list[str]
    top_tags: dict[str, str]
    top_words: list[str]
    cohesion: float  # mean cosine similarity of members to the centroid
    mean_rating: float | None
    rating_count: int


async def fetch_embeddings(store: PatternStore, *, max_patterns: int = MAX_CLUSTER_PATTERNS) -> list[PatternRecord]:
    """Every stored pattern with its vector, newest ``max_patterns`` when memory is larger, sorted by id so that
    clustering sees the same order every time."""
    keys = sorted(await store.keys(), key=lambda k: (-k[1], k[0]))
    ids = sorted(pattern_id for pattern_id, _ in keys[:max_patterns])
    records: list[PatternRecord] = []
    for start in range(0, len(ids), FETCH_BATCH):
        records.extend(await store.get_many(ids[start:start + FETCH_BATCH], include_embedding=True))
    records.sort(key=lambda r: r.id)
    records = [r for r in records if r.embedding]
    for start in range(0, len(records), FETCH_BATCH):  # the music descriptors label the clusters
        await store.attach_music(records[start:start + FETCH_BATCH])
    return records


async def detect_clusters(store: PatternStore, k: int | None = None, *, feedback: FeedbackStore | None = None,
                          max_k: int = 12) -> list[Cluster]:
    """Cluster pattern memory; largest cluster first. ``k`` fixes the count, else the silhouette picks it."""
    records = await fetch_embeddings(store)
    if not records:
        return []
    if k is not None and not 1 <= k <= len(records):
        raise InvalidArgument(f"k must be 1..{len(records)} (the number of stored patterns), got {k}")
    ratings = await feedback.ratings([r.id for r in records]) if feedback else {}
    # Tens of ms of numpy and text work per thousand patterns: in the CPU pool, so that the event loop (and the
    # Compose call whose cluster context triggered this refresh) keeps streaming meanwhile.
    return await run_cpu(_cluster, records, k, max_k, ratings)


def _cluster(records: Sequence[PatternRecord], k: int | None, max_k: int,
             ratings: Mapping[str, RatingSummary]) -> list[Cluster]:
    x = normalise(np.asarray([r.embedding for r in records], dtype=np.float64))
    k = k or choose_k(x, max_k)
    labels, centroids = spherical_kmeans(x, k)
    clusters = [_describe_cluster(c, [records[i] for i in np.flatnonzero(labels == c)], x[labels == c],
                                  centroids[c], ratings) for c in range(k) if np.any(labels == c)]
    clusters.sort(key=lambda c: (-c.size, c.label, c.member_ids[0]))
    return [dataclasses.replace(c, index=i) for i, c in enumerate(clusters)]


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def spherical_kmeans(x: np.ndarray, k: int, *, restarts: int = 4, max_iter: int = 100) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """k-means under cosine on unit vectors; the best of ``restarts`` seeded k-means++ starts (deterministic)."""
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for seed in range(restarts):
        labels, centroids = _kmeans_once(x, k, np.random.default_rng(seed), max_iter)
        inertia = float(np.sum(1.0 - np.sum(x * centroids[labels], axis=1)))
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels, centroids)
    assert best is not None
    return best[1], best[2]


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    centroids = _kmeans_pp(x, k, rng)
    labels = np.full(len(x), -1)
    for _ in range(max_iter):
        new = np.argmax(x @ centroids.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = _update_centroids(x, labels, centroids)
    return labels, centroids


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [int(rng.integers(len(x)))]
    dist = 1.0 - x @ x[centres[0]]
    for _ in range(1, k):
        weights = np.clip(dist, 0, None) ** 2
        total = weights.sum()
        nxt = int(rng.choice(len(x), p=weights / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
    return x[centres].copy()


def _update_centroids(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Mean direction of each cluster; an emptied cluster restarts at the point worst served by its centroid."""
    centroids = old.copy()
    for c in range(len(old)):
        members = x[labels == c]
        if len(members):
            centroids[c] = members.sum(axis=0)
        else:
            fit = np.sum(x * old[labels], axis=1)
            centroids[c] = x[int(np.argmin(fit))]
    return normalise(centroids)


def choose_k(x: np.ndarray, max_k: int = 12) -> int:
    """The k in 2..max_k with the best mean cosine silhouette (on a fixed sample above 2,000 patterns)."""
    n = len(x)
    if n < 3:
        return 1
    sample = x if n <= SILHOUETTE_SAMPLE else x[np.sort(np.random.default_rng(0).choice(
        n, SILHOUETTE_SAMPLE, replace=False))]
    distances = np.clip(1.0 - sample @ sample.T, 0.0, 2.0)
    best_k, best_score = 1, -np.inf
    for k in range(2, min(max_k, len(sample) - 1) + 1):
        labels, _ = spherical_kmeans(sample, k)
        score = silhouette(distances, labels)
        if score > best_score + 1e-9:
            best_k, best_score = k, score
    return best_k


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette for a precomputed distance matrix; members of singleton clusters count 0."""
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return 0.0
    sums = np.stack([distances[:, labels == c].sum(axis=1) for c in clusters], axis=1)
    counts = np.array([np.sum(labels == c) for c in clusters], dtype=np.float64)
    own = np.searchsorted(clusters, labels)
    own_counts = counts[own]
    a = np.where(own_counts > 1, sums[np.arange(len(labels)), own] / np.maximum(own_counts - 1, 1), 0.0)
    means = sums / counts
    means[np.arange(len(labels)), own] = np.inf
    b = means.min(axis=1)
    s = np.where(own_counts > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def _describe_cluster(index: int, members: list[PatternRecord], vectors: np.ndarray, centroid: np.ndarray,
                      ratings: Mapping[str, RatingSummary]) -> Cluster:
    top_tags = {**_common_tags(members), **_common_music(members)}
    tag_terms = {w for v in top_tags.values() for w in keywords_all(v)}
    words = _common_words(members, exclude=tag_terms)
    terms = [v for t in top_tags.values() for v in t.split(",")] + words
    label = ", ".join(dict.fromkeys(t.strip() for t in terms if t.strip())) or "unlabelled"
    rated = [ratings[m.id] for m in members if m.id in ratings]
    count, total = sum(r.count for r in rated), sum(r.total for r in rated)
    return Cluster(
        index=index, label=truncate(label, 120), size=len(members), centroid=[float(v) for v in centroid],
        member_ids=[m.id for m in members], top_tags=top_tags, top_words=words,
        cohesion=round(float(np.mean(vectors @ centroid)), 6), mean_rating=(total / count) if count else None,
        rating_count=count)


def _common_music(members: Sequence[PatternRecord], *, share: float = 0.5) -> dict[str, str]:
    """The members' shared music descriptors: the key and the top tagger label at least half of them have, and
    their median tempo ("music.key", "music.tag", "music.tempo_bpm"); nothing for patterns without descriptors."""
    music = [m.music for m in members if m.music is not None]
    if not music or len(music) < share * len(members):
        return {}
    out: dict[str, str] = {}
    for name, values in (("music.key", [f.key for f in music if f.key]),
                         ("music.tag", [f.tags[0][0] for f in music if f.tags])):
        if values:
            value, n = Counter(values).most_common(1)[0]
            if n >= share * len(members):
                out[name] = value
    tempos = [f.tempo_bpm for f in music if f.tempo_bpm > 0]
    if len(tempos) >= share * len(members):
        out["music.tempo_bpm"] = f"{float(np.median(tempos)):.0f}"
    return out


def _common_tags(members: Sequence[PatternRecord], *, share: float = 0.5, limit: int = 3) -> dict[str, str]:
    """Descriptive key=value tags carried by at least half the members (most common first)."""
    counts = Counter((k, v) for m in members for k, v in m.tags.items() if k not in BOOKKEEPING_TAGS and v)
    out: dict[str, str] = {}
    for (key, value), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n >= share * len(members) and key not in out and len(out) < limit:
            out[key] = value
    return out


def _common_words(members: Sequence[PatternRecord], *, exclude: Iterable[str] = (), share: float = 0.3,
                  limit: int = 3) -> list[str]:
    """Prompt words found in at least 30% of the members' prompts (counted once per member), other than the words
    the label already has from tags."""
    skip = set(exclude)
    counts = Counter(w for m in members for w in set(keywords_all(m.metadata.get("prompt", ""))) if w not in skip)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, n in ranked if n >= share * len(members)][:limit]


def keywords_all(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z0-9-]{2,31}", text.lower()) if w not in STOPWORDS]
