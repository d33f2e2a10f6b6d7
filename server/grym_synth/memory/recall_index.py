"""In-memory keyword index over pattern memory, for text recall (Compose's context, ``recall`` plan steps).

Why it exists: text recall used to be a milvus-lite ``query`` whose filter has one ``like`` clause per request
word x spelling x searched field (:func:`grym_synth.memory.learning.keyword_filter`). That cost ~15 ms with 50
patterns, grew with the store, and Compose pays it before the coordinator's first token. The searchable text of a
pattern is a few short fields and one host's memory holds thousands of patterns, not millions, so a copy of every
pattern's scalar fields plus an inverted index answers the same question in microseconds, with no I/O.

What matches (the Milvus filter's meaning, kept): a request word ``w`` (from
:func:`grym_synth.memory.learning.keywords`, ``[a-z][a-z0-9-]{2,31}``) matches a pattern when ``w`` is a substring
of its prompt (``metadata["prompt"]``) or of one of its :data:`~grym_synth.memory.learning.DESCRIPTIVE_TAGS` values.
A word holds only ``[a-z0-9-]``, so inside a field it can only lie within one maximal run of those characters of
the lowercased text (a *token*): "``w`` is in the field" is exactly "``w`` is a substring of one of the field's
tokens". The index keeps token -> pattern ids, and finds the vocabulary tokens containing a word by scanning the
vocabulary once per word, then remembers them (kept current as the vocabulary grows). One deliberate difference:
matching ignores case completely, where LIKE is case-sensitive and was tried with the lower, Capitalised and UPPER
spellings only, so a prompt saying "PiAnO" matches "piano" here and did not there. Scores are unaffected
(:func:`~grym_synth.memory.learning.keyword_similarity` lowercases too). When more than ``limit`` patterns match, the
newest ``limit`` are returned (Milvus returned an arbitrary ``limit`` of them).

Staying in sync:

* this replica's writes: :class:`~grym_synth.memory.store.PatternStore` calls :meth:`RecallIndex.add` /
  :meth:`RecallIndex.remove` after Milvus accepted an insert or delete;
* the first full load (:meth:`RecallIndex.load`) reads every pattern's scalar fields (never the vectors, which
  made milvus-lite ~60x slower); until it has finished ``ready`` is False and recall keeps querying Milvus, so
  correctness never depends on the index;
* other replicas sharing a Milvus server: :meth:`RecallIndex.reconcile`, every ``recall_index_refresh_s``
  (:meth:`RecallIndex.keep_in_sync`), adds ids Milvus has and the index lacks, and drops ids Milvus no longer has.
  It also heals the rare local write the store could not report (its caller was cancelled while Milvus applied it).

A Milvus server reads with bounded staleness by default, so a load or reconcile may not yet see a write this
replica made a moment ago (or still see a row it just deleted). This replica's own writes therefore win over what
Milvus reports for ``local_wins_s`` (:data:`LOCAL_WINS_S`) after they were made.

Concurrency: everything runs on the event loop's thread, and every read or mutation is synchronous (no ``await``
inside), so a reader never sees a half-applied change. Only load and reconcile await Milvus; they apply what they
fetched synchronously afterwards, checked against the local writes made meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from grym_synth.memory.learning import DESCRIPTIVE_TAGS, FETCH_BATCH, RECALL_CANDIDATES
from grym_synth.memory.store import PatternRecord

if TYPE_CHECKING:
    from grym_synth.memory.store import PatternStore

log = logging.getLogger(__name__)

TOKEN = re.compile(r"[a-z0-9-]+")
HAS_LETTER = re.compile(r"[a-z]")
MIN_WORD = 3  # keywords() words are 3..32 characters and start with a letter
LOCAL_WINS_S = 60.0
LOAD_RETRY_S = 5.0
MAX_CACHED_WORDS = 8192


def searchable_tokens(record: PatternRecord) -> frozenset[str]:
    """The tokens of the fields recall searches. Tokens that no request word can lie in (shorter than a word, or
    without a letter, such as seeds and bpm numbers) are left out to keep the vocabulary small."""
    fields = [record.metadata.get("prompt", ""), *(record.tags.get(k, "") for k in DESCRIPTIVE_TAGS)]
    return frozenset(t for f in fields if f for t in TOKEN.findall(str(f).lower())
                     if len(t) >= MIN_WORD and HAS_LETTER.search(t))


def _newest_first(record: PatternRecord) -> tuple[int, str]:
    return -record.created_at_us, record.id


class RecallIndex:
    """Pattern records (scalar fields only) with an inverted index from tokens to pattern ids."""

    def __init__(self, *, local_wins_s: float = LOCAL_WINS_S) -> None:
        self.ready = False
        self.local_wins_s = local_wins_s
        self._records: dict[str, PatternRecord] = {}
        self._tokens: dict[str, frozenset[str]] = {}  # pattern id -> its tokens
        self._postings: dict[str, set[str]] = {}  # token (the vocabulary) -> pattern ids
        # Every token ever added to the vocabulary, in order; a cached word remembers how far it has looked, so
        # bringing it up to date scans only the tokens added since (compacted when it grows stale).
        self._vocab_log: list[str] = []
        self._word_tokens: dict[str, tuple[set[str], int]] = {}
        self._local: dict[str, tuple[float, bool]] = {}  # id -> (monotonic time, present) of this replica's writes

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, pattern_id: object) -> bool:
        return pattern_id in self._records

    def ids(self) -> set[str]:
        return set(self._records)

    # --- reads ----------------------------------------------------------------------------------------------------
    def candidates(self, words: Sequence[str], tag_filter: Mapping[str, str] | None = None, *,
                   limit: int = RECALL_CANDIDATES) -> list[PatternRecord]:
        """Patterns matching any of ``words`` (as :func:`~grym_synth.memory.learning.keywords` gives them: lowercase,
        3+ characters) and carrying every ``tag_filter`` key=value, newest first, at most ``limit``. The records are
        the index's own: read, do not mutate."""
        ids: set[str] = set()
        for word in words:
            for token in self._tokens_containing(word):
                posting = self._postings.get(token)  # None: the token has left the vocabulary since
                if posting:
                    ids |= posting
        records = [self._records[i] for i in ids]
        if tag_filter:
            wanted = list(tag_filter.items())
            records = [r for r in records if all(r.tags.get(k) == v for k, v in wanted)]
        if len(records) > limit:
            return heapq.nsmallest(limit, records, key=_newest_first)
        records.sort(key=_newest_first)
        return records

    def _tokens_containing(self, word: str) -> set[str]:
        cached = self._word_tokens.get(word)
        if cached is None:
            if len(self._word_tokens) >= MAX_CACHED_WORDS:
                self._word_tokens.clear()
            tokens = {t for t in self._postings if word in t}
        else:
            tokens, seen = cached
            if seen == len(self._vocab_log):
                return tokens
            tokens.update(t for t in self._vocab_log[seen:] if word in t)
        self._word_tokens[word] = (tokens, len(self._vocab_log))
        return tokens

    # --- this replica's writes --------------------------------------------------------------------------------------
    def add(self, record: PatternRecord) -> None:
        """A pattern this replica stored (called once Milvus has accepted it)."""
        self._note_local(record.id, True)
        self._put(record)

    def remove(self, pattern_id: str) -> None:
        """A pattern this replica deleted (called once Milvus has deleted it)."""
        self._note_local(pattern_id, False)
        self._drop(pattern_id)

    def replace_all(self, records: Iterable[PatternRecord]) -> None:
        """Rebuild from scratch (``ready`` is left as it is)."""
        self._records.clear()
        self._tokens.clear()
        self._postings.clear()
        self._vocab_log.clear()
        self._word_tokens.clear()
        for record in records:
            self._put(record)

    def _note_local(self, pattern_id: str, present: bool) -> None:
        now = time.monotonic()
        self._local[pattern_id] = (now, present)
        if len(self._local) > 4096:
            self._forget_old_local(now)

    def _forget_old_local(self, now: float) -> None:
        self._local = {i: v for i, v in self._local.items() if now - v[0] < self.local_wins_s}

    def _recent_local(self, now: float) -> dict[str, bool]:
        """Ids this replica wrote within ``local_wins_s`` -> whether they exist."""
        self._forget_old_local(now)
        return {i: present for i, (_, present) in self._local.items()}

    # --- the structures -----------------------------------------------------------------------------------------------
    def _put(self, record: PatternRecord) -> None:
        # Own copies of the dicts, no vector: the caller's record may change, and vectors would cost memory only.
        record = dataclasses.replace(record, tags=dict(record.tags), metadata=dict(record.metadata),
                                     embedding=None, score=None)
        self._drop(record.id)
        tokens = searchable_tokens(record)
        self._records[record.id] = record
        self._tokens[record.id] = tokens
        for token in tokens:
            posting = self._postings.get(token)
            if posting is None:
                self._postings[token] = {record.id}
                self._vocab_log.append(token)
            else:
                posting.add(record.id)

    def _drop(self, pattern_id: str) -> None:
        if self._records.pop(pattern_id, None) is None:
            return
        for token in self._tokens.pop(pattern_id):
            posting = self._postings[token]
            posting.discard(pattern_id)
            if not posting:
                del self._postings[token]
        if len(self._vocab_log) > 2 * len(self._postings) + 1024:  # mostly tokens that have left: compact
            self._vocab_log = list(self._postings)
            self._word_tokens.clear()

    # --- syncing with Milvus ------------------------------------------------------------------------------------------
    async def load(self, store: PatternStore) -> None:
        """The full load: every pattern's scalar fields, with this replica's recent writes on top; then ready."""
        started = time.perf_counter()
        merged = {r.id: r for r in await store.all_records()}
        for pattern_id, present in self._recent_local(time.monotonic()).items():
            if not present:
                merged.pop(pattern_id, None)
            elif pattern_id in self._records:
                merged[pattern_id] = self._records[pattern_id]
        self.replace_all(merged.values())
        self.ready = True
        log.info("recall index loaded: %d patterns, %d tokens in %.0f ms", len(self._records), len(self._postings),
                 (time.perf_counter() - started) * 1000)

    async def reconcile(self, store: PatternStore) -> tuple[int, int]:
        """Pick up other replicas' writes: add the patterns Milvus has and the index lacks, drop those Milvus no
        longer has. Returns (added, dropped)."""
        live = {pattern_id for pattern_id, _ in await store.keys()}
        local = self._recent_local(time.monotonic())
        missing = [i for i in live if i not in self._records and i not in local]
        fetched: list[PatternRecord] = []
        for start in range(0, len(missing), FETCH_BATCH):
            fetched.extend(await store.get_many(missing[start:start + FETCH_BATCH]))
        # Local writes may have happened while fetching: they win, as do the ones from before.
        local = self._recent_local(time.monotonic())
        added = 0
        for record in fetched:
            if record.id not in self._records and record.id not in local:
                self._put(record)
                added += 1
        gone = [i for i in self._records if i not in live and i not in local]
        for pattern_id in gone:
            self._drop(pattern_id)
        return added, len(gone)

    async def keep_in_sync(self, store: PatternStore, refresh_s: float, *, retry_s: float = LOAD_RETRY_S) -> None:
        """The background task: the full load (retried until it succeeds; recall uses Milvus meanwhile), then a
        reconcile every ``refresh_s`` seconds (0: never, for a single replica that sees all writes itself).
        Failures are logged and retried: recall from the index keeps working through a Milvus outage."""
        while not self.ready:
            try:
                await self.load(store)
            except Exception as exc:  # Milvus down or slow: recall keeps querying it; keep trying
                log.warning("recall index not loaded (%s: %s); recall queries Milvus; retrying in %.0fs",
                            type(exc).__name__, exc, retry_s)
                await asyncio.sleep(retry_s)
        if refresh_s <= 0:
            return
        while True:
            await asyncio.sleep(refresh_s)
            try:
                added, dropped = await self.reconcile(store)
            except Exception as exc:  # Milvus down: recall keeps answering from the index; keep trying
                log.warning("recall index not reconciled with Milvus (%s: %s); retrying in %.0fs",
                            type(exc).__name__, exc, refresh_s)
                continue
            if added or dropped:
                log.info("recall index reconciled: %d patterns added, %d dropped (other replicas' writes)",
                         added, dropped)
